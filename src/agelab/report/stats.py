"""The statistics behind the report, as pure functions of a runs table.

Small pieces (t-intervals, the paired t-test, Holm's step-down adjustment), the type-II ANOVA
of test MAE with the replicate seed as a block, paired comparisons of factor levels, the best
cell against its runner-up (paired on seed), the power of a paired t-test (what an undecided
comparison could have detected, and the seeds that would detect a given effect), and the
observed coverage at the MAE against the normal, Laplace and fitted-shape (β) predictions.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from agelab.metrics import LAPLACE_CS_AT_MAE, NORMAL_CS_AT_MAE, coverage_at_mae_for_beta
from agelab.report.design import Design


def t_interval(values: Any, confidence: float = 0.95) -> tuple[float, float, float, int]:
    """Mean and two-sided t-interval of the finite values: (mean, lo, hi, n); NaN when n < 2."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def geometric_t_interval(values: Any, confidence: float = 0.95) -> tuple[float, float, float, int]:
    """Geometric mean and its t-interval, computed on the log scale: for a positive shape
    parameter such as β, whose estimates are skewed (bounded by 0, long right tail), so
    the interval cannot go below 0 and one wild run does not drag the centre."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x) & (x > 0)]
    mean, lo, hi, n = t_interval(np.log(x), confidence)
    return (
        math.exp(mean) if n else math.nan,
        math.exp(lo) if n > 1 else math.nan,
        math.exp(hi) if n > 1 else math.nan,
        n,
    )


def paired_test(d: np.ndarray) -> float:
    """Two-sided one-sample t-test of paired differences against 0 (NaN if untestable)."""
    d = d[np.isfinite(d)]
    if len(d) < 2 or float(np.std(d, ddof=1)) == 0.0:
        return math.nan
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values; NaN stays NaN and is not counted in the family."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def _q(name: str) -> str:
    return "x_" + re.sub(r"\W", "_", name)


@dataclass
class _Model:
    """The OLS model of test MAE: its data and its candidate terms (patsy names)."""

    data: pd.DataFrame
    main: list[str]
    inter: list[str]
    block: list[str]
    names: dict[str, str]  # patsy term → label in the report
    numeric: list[str]


def anova_table(
    complete: pd.DataFrame, design: Design
) -> tuple[pd.DataFrame | None, str, pd.DataFrame | None]:
    """Type-II ANOVA of test MAE (+ the fitted regression when there are numeric covariates).

    Two-way interactions are included when every combination of the two factors was
    observed and the model keeps at least two residual degrees of freedom; otherwise the
    main-effects model is used and the note says so. With two or more replicate seeds the
    seed enters as a block (as the paired comparisons pair on it); its row is shown but is
    never part of the tested family.
    """
    model = _anova_model(complete, design)
    if model is None:
        return None, "no factor has two levels with completed runs: nothing to test", None
    found = _first_estimable(model)
    if found is None:
        return None, "too few completed runs for an ANOVA", None
    fit, table, terms, failed_any = found
    left = []
    if model.inter and not set(model.inter) <= set(terms):
        left.append("interactions")
    if model.block and not set(model.block) <= set(terms):
        left.append("the seed block")
    note = (
        f"{' and '.join(left)} left out: too few completed runs for them"
        if left and failed_any
        else ""
    )
    out = _anova_rows(table, model.data["mae"], model.names)
    out.attrs["df_resid"] = float(fit.df_resid)
    regression = None
    if model.numeric or design.sampler != "grid":
        regression = _regression(fit, model.names)
    return out, note, regression


def _anova_model(complete: pd.DataFrame, design: Design) -> _Model | None:
    """Factors with ≥ 2 observed levels, numeric covariates with ≥ 3 values (log for log
    ranges), the fully crossed pairs' interactions and the seed block; None if nothing varies."""
    factors = [f for f in design.factors if complete[f].astype(str).nunique() >= 2]
    numeric = [k for k in design.numeric if complete[k].nunique() >= 3]
    if not factors and not numeric:
        return None
    data = pd.DataFrame({"mae": complete["mae"].astype(float).to_numpy()})
    for f in factors:
        data[_q(f)] = complete[f].astype(str).to_numpy()
    for k in numeric:
        x = complete[k].astype(float).to_numpy()
        data[_q(k)] = np.log(x) if k in design.log_numeric else x
    main = [f"C({_q(f)})" for f in factors] + [_q(k) for k in numeric]
    pairs = [
        (a, b)
        for a, b in itertools.combinations(factors, 2)
        if complete.groupby([a, b]).size().size
        == complete[a].astype(str).nunique() * complete[b].astype(str).nunique()
    ]
    inter = [f"C({_q(a)}):C({_q(b)})" for a, b in pairs]
    names = {f"C({_q(f)})": design.label(f) for f in factors} | {
        _q(k): (f"log {design.label(k)}" if k in design.log_numeric else design.label(k))
        for k in numeric
    }
    names |= {f"C({_q(a)}):C({_q(b)})": f"{design.label(a)} × {design.label(b)}" for a, b in pairs}
    block: list[str] = []
    if complete["seed"].astype(str).nunique() >= 2 and design.sampler != "tpe":
        data["x_seed"] = complete["seed"].astype(str).to_numpy()
        block = ["C(x_seed)"]
        names["C(x_seed)"] = "seed (block)"
    return _Model(data, main, inter, block, names, numeric)


def _first_estimable(model: _Model) -> tuple[Any, pd.DataFrame, list[str], bool] | None:
    """The richest model that can be estimated: (fit, ANOVA table, its terms, whether a
    richer one failed), trying with interactions and block, then dropping them."""
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    main, inter, block = model.main, model.inter, model.block
    candidates = [main + inter + block, main + block, main + inter, main]
    failed_any = False
    seen: list[list[str]] = []
    for terms in candidates:
        if not terms or terms in seen:
            continue
        seen.append(terms)
        min_df = 2 if inter and set(inter) <= set(terms) else 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = smf.ols("mae ~ " + " + ".join(terms), data=model.data).fit()
            if fit.df_resid < min_df or fit.model.rank < len(fit.params):
                failed_any = True
                continue
            return fit, anova_lm(fit, typ=2), terms, failed_any
    return None


def _anova_rows(table: pd.DataFrame, mae: pd.Series, names: dict[str, str]) -> pd.DataFrame:
    """One row per term: df, F, p, η² and partial η²."""
    ss_total = float(((mae - mae.mean()) ** 2).sum())
    resid = float(table.loc["Residual", "sum_sq"])
    rows = []
    for term, r in table.drop(index="Residual").iterrows():
        ss = float(r["sum_sq"])
        rows.append(
            {
                "term": names.get(term, term),
                "interaction": ":" in term,
                "block": term == "C(x_seed)",
                "df": float(r["df"]),
                "sum_sq": ss,
                "F": float(r["F"]),
                "p": float(r["PR(>F)"]),
                "eta_sq": ss / ss_total if ss_total > 0 else math.nan,
                "partial_eta_sq": ss / (ss + resid) if ss + resid > 0 else math.nan,
            }
        )
    return pd.DataFrame(rows)


def _regression(fit: Any, names: dict[str, str]) -> pd.DataFrame:
    """The fitted coefficients with their intervals (random searches, numeric covariates)."""
    ci = fit.conf_int()
    return pd.DataFrame(
        {
            "term": [_pretty_coef(t, names) for t in fit.params.index],
            "coef": fit.params.to_numpy(),
            "lo": ci[0].to_numpy(),
            "hi": ci[1].to_numpy(),
            "p": fit.pvalues.to_numpy(),
        }
    )


def _pretty_coef(term: str, names: dict[str, str]) -> str:
    m = re.fullmatch(r"(C\(\w+\))\[T\.(.*)\]", term)
    if m:
        return f"{names.get(m.group(1), m.group(1))} = {m.group(2)}"
    return names.get(term, term)


COMPARISON_COLUMNS = [
    "factor", "key", "level_a", "level_b", "n_pairs", "diff", "lo", "hi", "p", "strata",
    "sd", "n_seeds",
]  # fmt: skip
SIMPLE_COLUMNS = ["factor", "level_a", "level_b", "at", "n_pairs", "diff", "lo", "hi"]


def paired_comparisons(
    complete: pd.DataFrame, design: Design, confidence: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pooled paired differences per factor level pair, and the same split by other factors.

    Runs that share the seed and every other choice are paired; the mean difference of test
    MAE (level b − level a) gets a t-interval and a paired t-test."""
    rows: list[dict[str, Any]] = []
    simple: list[dict[str, Any]] = []
    for f in design.factors:
        pooled, per_level = _compare_levels(complete, design, f, confidence)
        rows += pooled
        simple += per_level
    return (
        pd.DataFrame(rows, columns=COMPARISON_COLUMNS),
        pd.DataFrame(simple, columns=SIMPLE_COLUMNS),
    )


def _compare_levels(
    complete: pd.DataFrame,
    design: Design,
    f: str,
    confidence: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Factor ``f``'s level pairs: pooled comparisons, and the same per level of the others."""
    rows: list[dict[str, Any]] = []
    simple: list[dict[str, Any]] = []
    others = [k for k in design.keys if k != f] + ["seed"]
    present = set(complete[f].astype(str))
    levels = [lv for lv in design.levels.get(f, []) if str(lv) in present]
    if len(levels) < 2:
        return rows, simple
    frame = complete.assign(_lv=complete[f].astype(str))
    for k in others:
        frame[k] = frame[k].astype(str)
    wide = frame.pivot_table(index=others, columns="_lv", values="mae", aggfunc="mean")
    for a, b in itertools.combinations(levels, 2):
        a_s, b_s = str(a), str(b)
        if a_s not in wide or b_s not in wide:
            continue
        pair = wide[[a_s, b_s]].dropna()
        d = (pair[b_s] - pair[a_s]).to_numpy(dtype=float)
        mean, lo, hi, n = t_interval(d, confidence)
        idx = pair.index.to_frame(index=False)
        strata = " × ".join(
            f"{idx[k].nunique()} {design.label(k) if k != 'seed' else 'seed'}s"
            for k in others
            if k in idx and idx[k].nunique() > 1
        )
        rows.append(
            {
                "factor": design.label(f),
                "key": f,
                "level_a": a_s,
                "level_b": b_s,
                "n_pairs": n,
                "diff": mean,
                "lo": lo,
                "hi": hi,
                "p": paired_test(d),
                "strata": strata or ("1 pair" if n == 1 else ""),
                "sd": float(np.std(d, ddof=1)) if n >= 2 else math.nan,
                "n_seeds": int(idx["seed"].nunique()) if n else 0,
            }
        )
        simple += _per_level(d, idx, others, design, design.label(f), a_s, b_s, confidence)
    return rows, simple


def _per_level(
    d: np.ndarray,
    idx: pd.DataFrame,
    others: list[str],
    design: Design,
    factor: str,
    a_s: str,
    b_s: str,
    confidence: float,
) -> list[dict[str, Any]]:
    """The paired differences ``d`` split by each level of every other factor."""
    out = []
    for g in others:
        if g == "seed" or g not in idx or idx[g].nunique() < 2:
            continue
        for level in sorted(idx[g].unique(), key=str):
            mask = (idx[g] == level).to_numpy()
            m, lo, hi, n = t_interval(d[mask], confidence)
            out.append(
                {
                    "factor": factor,
                    "level_a": a_s,
                    "level_b": b_s,
                    "at": f"{design.label(g)}={level}",
                    "n_pairs": n,
                    "diff": m,
                    "lo": lo,
                    "hi": hi,
                }
            )
    return out


def coverage_summary(complete: pd.DataFrame, confidence: float) -> dict[str, Any]:
    """Observed share within the MAE across runs vs the normal and Laplace predictions."""
    obs = complete["coverage_at_mae"].astype(float).to_numpy()
    obs = obs[np.isfinite(obs)]
    mean, lo, hi, n = t_interval(obs, confidence)
    lo, hi = max(lo, 0.0), min(hi, 1.0)  # NaN stays NaN
    verdicts = complete["verdict"].fillna("").replace("", "n/a").value_counts().to_dict()
    out: dict[str, Any] = {
        "n": n,
        "mean": mean,
        "lo": lo,
        "hi": hi,
        "normal": NORMAL_CS_AT_MAE,
        "laplace": LAPLACE_CS_AT_MAE,
        "closer_to_normal": int(
            np.sum(np.abs(obs - NORMAL_CS_AT_MAE) < np.abs(obs - LAPLACE_CS_AT_MAE))
        ),
        "verdicts": {str(k): int(v) for k, v in verdicts.items()},
    }
    if n == 0:
        out["fits"] = "no runs"
    elif n < 2:
        out["fits"] = "too few runs"
    else:
        has_n = lo <= NORMAL_CS_AT_MAE <= hi
        has_l = lo <= LAPLACE_CS_AT_MAE <= hi
        if has_n and not has_l:
            out["fits"] = "normal"
        elif has_l and not has_n:
            out["fits"] = "laplace"
        elif has_n and has_l:
            out["fits"] = "both"
        elif NORMAL_CS_AT_MAE < mean < LAPLACE_CS_AT_MAE:
            out["fits"] = "between"
        else:
            out["fits"] = "below" if mean < NORMAL_CS_AT_MAE else "above"
    return out


# ------------------------------------------------------------------- best cell vs runner-up


def cell_pair_test(
    complete: pd.DataFrame,
    design: Design,
    best: dict[str, Any],
    runner: dict[str, Any],
    confidence: float,
) -> dict[str, Any]:
    """The runner-up's test MAE minus the best cell's, paired on the replicate seed.

    Both cells are identified by their values of every searched key; runs of one cell that
    share a seed (TPE repeats) are averaged first. Returns the pairs, the mean difference with
    its t-interval, the paired t-test's p, the differences' standard deviation and the keys in
    which the two cells differ."""

    def per_seed(cell: dict[str, Any]) -> pd.Series:
        mask = np.ones(len(complete), dtype=bool)
        for k in design.keys:
            mask &= (complete[k].astype(str) == str(cell[k])).to_numpy()
        runs = complete[mask]
        return runs.groupby(runs["seed"].astype(str))["mae"].mean()

    both = pd.concat({"best": per_seed(best), "runner": per_seed(runner)}, axis=1).dropna()
    d = (both["runner"] - both["best"]).to_numpy(dtype=float)
    mean, lo, hi, n = t_interval(d, confidence)
    return {
        "n_pairs": n,
        "n_seeds": n,
        "diff": mean,
        "lo": lo,
        "hi": hi,
        "p": paired_test(d),
        "sd": float(np.std(d, ddof=1)) if n >= 2 else math.nan,
        "differs": [design.label(k) for k in design.keys if str(best[k]) != str(runner[k])],
    }


# ------------------------------------------------------------------------------------ power


def paired_power(n: float, effect: float, alpha: float) -> float:
    """Power of the two-sided paired (one-sample) t-test with ``n`` pairs at the standardised
    effect ``effect`` = mean difference / sd of the differences, at level ``alpha``: the
    noncentral t with n − 1 degrees of freedom and noncentrality effect·√n beyond either
    critical value (the formula of statsmodels' ``TTestPower``). Where scipy's noncentral t
    gives up (large noncentrality, few degrees of freedom) the same probability is integrated
    over the chi-square of the sample variance."""
    df = n - 1.0
    crit = float(stats.t.isf(alpha / 2.0, df))
    nc = effect * math.sqrt(n)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    if not math.isfinite(p):
        p = power_by_integral(df, crit, nc)
    return min(max(p, 0.0), 1.0)


@functools.cache
def _legendre(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(nodes)


def power_by_integral(df: float, crit: float, nc: float, nodes: int = 400) -> float:
    """P(|T| > crit) for T noncentral t(df, nc), as an integral over the chi-square quantile u
    of the sample variance: the mean over u of P(|Z + nc| > crit·√(χ²_u / df)), by
    Gauss–Legendre quadrature on (0, 1)."""
    x, w = _legendre(nodes)
    u = (x + 1.0) / 2.0
    s = crit * np.sqrt(stats.chi2.ppf(u, df) / df)
    inside = stats.norm.sf(s - nc) + stats.norm.cdf(-s - nc)
    return float(np.sum(w * inside) / 2.0)


def detectable_difference(sd: float, n: int, alpha: float, power: float = 0.8) -> float:
    """The smallest difference (years) the paired t-test detects with probability ``power``
    from ``n`` pairs whose differences have standard deviation ``sd``; NaN if n < 2 or sd is
    not positive."""
    if n < 2 or not sd > 0:
        return math.nan
    from scipy.optimize import brentq

    hi = 1.0
    while paired_power(n, hi, alpha) < power:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    return float(brentq(lambda e: paired_power(n, e, alpha) - power, 0.0, hi, xtol=1e-10)) * sd


def pairs_needed(sd: float, effect: float, alpha: float, power: float = 0.8) -> float:
    """Pairs (a real number, ≥ 2) at which the paired t-test reaches ``power`` for a true
    difference of ``effect`` years when the differences have standard deviation ``sd``; inf
    beyond ten million, NaN when sd is not positive."""
    if not sd > 0 or not effect > 0:
        return math.nan
    from scipy.optimize import brentq

    e = effect / sd
    if paired_power(2, e, alpha) >= power:
        return 2.0
    hi = 4.0
    while paired_power(hi, e, alpha) < power:
        hi *= 2.0
        if hi > 1e7:
            return math.inf
    return float(brentq(lambda n: paired_power(n, e, alpha) - power, 2.0, hi, xtol=1e-6))


def power_of(
    sd: float,
    n_pairs: int,
    n_seeds: int,
    *,
    alpha: float,
    power: float,
    min_effect: float,
) -> dict[str, float]:
    """What an undecided paired comparison could have found: the detectable difference with
    its ``n_pairs`` (``mde``), and about how many seeds would detect ``min_effect`` years
    (``seeds_needed``: pairs grow by n_pairs / n_seeds per added seed)."""
    mde = detectable_difference(sd, n_pairs, alpha, power)
    need = pairs_needed(sd, min_effect, alpha, power)
    per_seed = n_pairs / n_seeds if n_seeds else math.nan
    seeds = max(2.0, math.ceil(need / per_seed - 1e-9)) if math.isfinite(need) else need
    return {"mde": mde, "seeds_needed": seeds, "power_alpha": alpha}


# ----------------------------------------------------------------------- residual shape (β)


def shape_summary(complete: pd.DataFrame, confidence: float) -> dict[str, Any]:
    """Fitted residual shape β across runs (generalised normal: 2 normal, 1 Laplace): its
    geometric mean and interval (:func:`geometric_t_interval`), the share within the MAE
    that β predicts, and the observed share of the same runs."""
    beta = complete["shape_beta"].astype(float)
    ok = complete[np.isfinite(beta.to_numpy()) & (beta.to_numpy() > 0)]
    centre, lo, hi, n = geometric_t_interval(ok["shape_beta"], confidence)
    if n == 0:
        return {"n": 0}
    obs_mean, obs_lo, obs_hi, _ = t_interval(ok["coverage_at_mae"], confidence)
    return {
        "n": n,
        "beta": centre,
        "beta_lo": lo,
        "beta_hi": hi,
        "predicted": float(coverage_at_mae_for_beta(np.array([centre]))[0]),
        "observed": obs_mean,
        "observed_lo": max(obs_lo, 0.0),
        "observed_hi": min(obs_hi, 1.0),
    }

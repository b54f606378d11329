"""The ablation report: what a study's runs say about norm, act and backbone, in numbers and words.

Reads the trial runs of one study from MLflow into a pandas table (one row per planned
trial; a re-run cell keeps its completed attempt), then:

* **cells** — per searched cell: replicates, mean and t-interval of test MAE, coverage within
  the MAE and within 5 years, conformal 90 % width and coverage, the residual-shape verdicts,
  failed / pruned / lost attempts;
* **ANOVA** — type-II ANOVA (statsmodels OLS) of test MAE on the categorical choices and
  their two-way interactions, with η² (and numeric covariates for random searches, whose
  fitted coefficients are also shown);
* **paired comparisons** — for each factor and pair of its levels, runs that share the seed
  and every other choice are paired; the mean difference gets a t-interval and a paired t-test;
* **one family** — every p-value the report could call significant (ANOVA effects and paired
  comparisons) is Holm-adjusted together, so the chance of any false "significant" in a
  report stays at ``alpha`` however many factors there are;
* **coverage rule of thumb** — observed share within the MAE against the 0.575 (normal) and
  0.632 (Laplace) predictions;
* **best cell** by calib MAE (what the optimiser saw) with its test-MAE interval, and the
  runner-up when the intervals overlap;
* **verdict** — short sentences generated from those numbers only.

:func:`analyse` is a pure function of a runs table, so tests plant effects in synthetic tables
and check the report recovers them. :func:`build_report` wires it to a study's store and
writes ``report.md`` / ``report.html`` (see :mod:`agelab.report_render`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from agelab.config import Range, ReportConfig, StudyConfig, TrackingConfig
from agelab.errors import ReportError
from agelab.metrics import LAPLACE_CS_AT_MAE, NORMAL_CS_AT_MAE

#: Short names for the usual factors (others keep their last dotted part).
SHORT = {"model.norm": "norm", "model.act": "act", "model.backbone": "backbone"}
#: Columns summarised per cell: (metric, label in the tables).
CELL_METRICS = (
    ("mae", "test MAE"),
    ("coverage_at_mae", "within MAE"),
    ("coverage_at_5", "within 5 y"),
    ("conformal_90_width", "conformal 90 % width"),
    ("conformal_90_coverage", "conformal 90 % coverage"),
)
STATES = ("COMPLETE", "FAIL", "PRUNED", "KILLED", "RUNNING")


# ------------------------------------------------------------------------------ design


@dataclass
class Design:
    """What the study searched: categorical factors (with their planned levels) and ranges."""

    factors: list[str]
    levels: dict[str, list[Any]]
    numeric: list[str] = field(default_factory=list)
    log_numeric: set[str] = field(default_factory=set)
    seeds: list[Any] = field(default_factory=list)
    sampler: str = "grid"
    planned: int | None = None

    @classmethod
    def from_space(
        cls,
        space: dict[str, Any],
        seeds: list[Any],
        sampler: str = "grid",
        n_trials: int | None = None,
    ) -> Design:
        factors, levels, numeric, log_numeric = [], {}, [], set()
        for key, value in space.items():
            if isinstance(value, dict):
                value = Range.model_validate(value)
            if isinstance(value, Range):
                numeric.append(key)
                if value.log:
                    log_numeric.add(key)
            else:
                factors.append(key)
                levels[key] = list(value)
        if sampler == "grid":
            planned = math.prod(len(v) for v in levels.values()) * len(seeds)
        elif sampler == "random":
            planned = (n_trials or 0) * len(seeds)
        else:
            planned = n_trials
        return cls(factors, levels, numeric, log_numeric, list(seeds), sampler, planned)

    @property
    def keys(self) -> list[str]:
        return self.factors + self.numeric

    def label(self, key: str) -> str:
        return SHORT.get(key, key.split(".")[-1])


def cell_label(row: pd.Series | dict, keys: list[str], design: Design) -> str:
    return " · ".join(f"{design.label(k)}={_fmt_level(row[k])}" for k in keys)


def _fmt_level(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------- small statistics


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


# -------------------------------------------------------------------------- the analysis


@dataclass
class Analysis:
    design: Design
    runs: pd.DataFrame  # every planned trial's row (all states)
    cells: pd.DataFrame
    anova: pd.DataFrame | None
    anova_note: str
    regression: pd.DataFrame | None
    comparisons: pd.DataFrame
    simple_effects: pd.DataFrame
    coverage: dict[str, Any]
    best: dict[str, Any] | None
    missing: list[str]
    verdict: list[str]
    importances: dict[str, float] | None = None
    alpha: float = 0.05
    confidence: float = 0.95

    @property
    def complete(self) -> pd.DataFrame:
        return self.runs[self.runs["state"] == "COMPLETE"]

    def significant(self) -> list[str]:
        """Every effect the report calls significant (for tests and summaries)."""
        out = []
        if self.anova is not None:
            out += [f"anova:{t}" for t in self.anova.loc[self.anova["significant"], "term"]]
        sig = self.comparisons[self.comparisons["significant"]]
        out += [f"{r.factor}:{r.level_b}-{r.level_a}" for r in sig.itertuples()]
        return out


def normalise_runs(runs: pd.DataFrame, design: Design) -> pd.DataFrame:
    """Fill the columns :func:`analyse` relies on (a minimal table needs keys, seed, mae)."""
    df = runs.copy()
    missing = [k for k in [*design.keys, "seed"] if k not in df.columns]
    if missing:
        raise ReportError(f"runs table lacks the column(s) {missing}")
    if "state" not in df.columns:
        df["state"] = "COMPLETE"
    # Failed or pruned runs never log test metrics: a study of only those still reports.
    for col in ("best_calib_mae", "calib_mae", *(m for m, _ in CELL_METRICS)):
        if col not in df.columns:
            df[col] = math.nan
    for col in ("verdict", "reason"):
        if col not in df.columns:
            df[col] = ""
    if "attempts" not in df.columns:
        df["attempts"] = 1
    df["state"] = df["state"].fillna("RUNNING")
    # Levels as the study spelled them (a column of 0 and 0.2 would otherwise read 0.0).
    for f in design.factors:
        levels = design.levels.get(f, [])
        df[f] = pd.Series([_canon(v, levels) for v in df[f]], index=df.index, dtype=object)
    return df


def _canon(value: Any, levels: list[Any]) -> Any:
    for lv in levels:
        if type(lv) is type(value) and lv == value:
            return lv
    for lv in levels:
        if isinstance(lv, bool) or isinstance(value, bool):
            continue
        numbers = isinstance(lv, int | float) and isinstance(value, int | float | np.number)
        if numbers and float(lv) == float(value):
            return lv
    return value


def analyse(
    runs: pd.DataFrame,
    design: Design,
    *,
    alpha: float = 0.05,
    confidence: float = 0.95,
    importances: dict[str, float] | None = None,
) -> Analysis:
    """Everything the report says, from a runs table (one row per trial) and the design."""
    df = normalise_runs(runs, design)
    complete = df[(df["state"] == "COMPLETE") & np.isfinite(df["mae"].astype(float))]
    cells = cell_table(df, design, confidence)
    anova, note, regression = anova_table(complete, design)
    comparisons, simple = paired_comparisons(complete, design, confidence)

    # One family: every test the report may call significant.
    # The seed block is a nuisance term: shown, never tested.
    tested = [] if anova is None else anova.loc[~anova["block"], "p"].tolist()
    adjusted = holm(tested + comparisons["p"].tolist())
    n_anova = len(tested)
    if anova is not None:
        anova["p_holm"] = math.nan
        anova.loc[~anova["block"], "p_holm"] = adjusted[:n_anova]
        anova["significant"] = anova["p_holm"] < alpha
    comparisons["p_holm"] = adjusted[n_anova:]
    comparisons["significant"] = comparisons["p_holm"] < alpha

    out = Analysis(
        design=design,
        runs=df,
        cells=cells,
        anova=anova,
        anova_note=note,
        regression=regression,
        comparisons=comparisons,
        simple_effects=simple,
        coverage=coverage_summary(complete, confidence),
        best=best_cell(cells, complete, design),
        missing=missing_report(df, cells, design),
        verdict=[],
        importances=importances,
        alpha=alpha,
        confidence=confidence,
    )
    out.verdict = verdict(out)
    return out


def cell_table(df: pd.DataFrame, design: Design, confidence: float) -> pd.DataFrame:
    """One row per cell (planned grid cells included even with nothing complete)."""
    keys = design.keys
    groups: dict[tuple, pd.DataFrame] = (
        {
            (k if isinstance(k, tuple) else (k,)): g
            for k, g in df.groupby(keys, sort=False, dropna=False)
        }
        if keys
        else {(): df}
    )
    if design.sampler == "grid" and design.factors and not design.numeric:
        for combo in itertools.product(*(design.levels[f] for f in design.factors)):
            groups.setdefault(tuple(combo), df.iloc[0:0])
    rows = []
    for key, g in groups.items():
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        done = g[(g["state"] == "COMPLETE") & np.isfinite(g["mae"].astype(float))]
        row["cell"] = cell_label(row, keys, design) if keys else "all runs"
        row["n"] = len(done)
        row["seeds"] = sorted(done["seed"].tolist(), key=str)
        for state in ("FAIL", "PRUNED", "KILLED", "RUNNING"):
            row[state.lower()] = int((g["state"] == state).sum())
        row["retried"] = int(g["attempts"].sum() - len(g))
        for metric, _ in CELL_METRICS:
            mean, lo, hi, _n = t_interval(done[metric], confidence)
            if "coverage" in metric:  # a share: the interval cannot leave [0, 1]
                lo, hi = max(lo, 0.0), min(hi, 1.0)
            row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"] = mean, lo, hi
        # The objective: best_calib_mae (calib_mae's latest value is the last epoch's).
        calib = done["best_calib_mae"].where(done["best_calib_mae"].notna(), done["calib_mae"])
        row["calib_mae"] = float(calib.astype(float).mean()) if len(done) else math.nan
        verdicts = done["verdict"].fillna("").replace("", "n/a").value_counts()
        row["verdicts"] = ", ".join(f"{v} {c}" for v, c in verdicts.items())
        rows.append(row)
    cells = pd.DataFrame(rows)
    return cells.sort_values(["mae", "cell"], na_position="last").reset_index(drop=True)


def _q(name: str) -> str:
    return "x_" + re.sub(r"\W", "_", name)


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
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    factors = [f for f in design.factors if complete[f].astype(str).nunique() >= 2]
    numeric = [k for k in design.numeric if complete[k].nunique() >= 3]
    if not factors and not numeric:
        return None, "no factor has two levels with completed runs: nothing to test", None
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
    note = ""
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
            fit = smf.ols("mae ~ " + " + ".join(terms), data=data).fit()
            if fit.df_resid < min_df or fit.model.rank < len(fit.params):
                failed_any = True
                continue
            table = anova_lm(fit, typ=2)
        left = []
        if inter and not set(inter) <= set(terms):
            left.append("interactions")
        if block and not set(block) <= set(terms):
            left.append("the seed block")
        note = (
            f"{' and '.join(left)} left out: too few completed runs for them"
            if left and failed_any
            else ""
        )
        ss_total = float(((data["mae"] - data["mae"].mean()) ** 2).sum())
        resid = float(table.loc["Residual", "sum_sq"])
        rows = []
        for term, r in table.drop(index="Residual").iterrows():
            rows.append(
                {
                    "term": names.get(term, term),
                    "interaction": ":" in term,
                    "block": term == "C(x_seed)",
                    "df": float(r["df"]),
                    "sum_sq": float(r["sum_sq"]),
                    "F": float(r["F"]),
                    "p": float(r["PR(>F)"]),
                    "eta_sq": float(r["sum_sq"]) / ss_total if ss_total > 0 else math.nan,
                    "partial_eta_sq": float(r["sum_sq"]) / (float(r["sum_sq"]) + resid)
                    if float(r["sum_sq"]) + resid > 0
                    else math.nan,
                }
            )
        out = pd.DataFrame(rows)
        out.attrs["df_resid"] = float(fit.df_resid)
        regression = None
        if numeric or design.sampler != "grid":
            ci = fit.conf_int()
            regression = pd.DataFrame(
                {
                    "term": [_pretty_coef(t, names) for t in fit.params.index],
                    "coef": fit.params.to_numpy(),
                    "lo": ci[0].to_numpy(),
                    "hi": ci[1].to_numpy(),
                    "p": fit.pvalues.to_numpy(),
                }
            )
        return out, note, regression
    return None, "too few completed runs for an ANOVA", None


def _pretty_coef(term: str, names: dict[str, str]) -> str:
    m = re.fullmatch(r"(C\(\w+\))\[T\.(.*)\]", term)
    if m:
        return f"{names.get(m.group(1), m.group(1))} = {m.group(2)}"
    return names.get(term, term)


def paired_comparisons(
    complete: pd.DataFrame, design: Design, confidence: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pooled paired differences per factor level pair, and the same split by other factors."""
    cols = [
        "factor",
        "key",
        "level_a",
        "level_b",
        "n_pairs",
        "diff",
        "lo",
        "hi",
        "p",
        "strata",
    ]
    rows, simple = [], []
    for f in design.factors:
        others = [k for k in design.keys if k != f] + ["seed"]
        present = set(complete[f].astype(str))
        levels = [lv for lv in design.levels.get(f, []) if str(lv) in present]
        if len(levels) < 2:
            continue
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
                }
            )
            for g in others:
                if g == "seed" or g not in idx or idx[g].nunique() < 2:
                    continue
                for level in sorted(idx[g].unique(), key=str):
                    mask = (idx[g] == level).to_numpy()
                    m, lo_s, hi_s, n_s = t_interval(d[mask], confidence)
                    simple.append(
                        {
                            "factor": design.label(f),
                            "level_a": a_s,
                            "level_b": b_s,
                            "at": f"{design.label(g)}={level}",
                            "n_pairs": n_s,
                            "diff": m,
                            "lo": lo_s,
                            "hi": hi_s,
                        }
                    )
    comparisons = pd.DataFrame(rows, columns=cols)
    simple_cols = ["factor", "level_a", "level_b", "at", "n_pairs", "diff", "lo", "hi"]
    return comparisons, pd.DataFrame(simple, columns=simple_cols)


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


def best_cell(cells: pd.DataFrame, complete: pd.DataFrame, design: Design) -> dict[str, Any] | None:
    """Best cell by mean calib MAE (test MAE when calib is missing) and its runner-up."""
    done = cells[cells["n"] > 0].copy()
    if done.empty:
        return None
    by = "calib_mae" if done["calib_mae"].notna().all() else "mae"
    done = done.sort_values([by, "mae"]).reset_index(drop=True)
    best = done.iloc[0].to_dict()
    out: dict[str, Any] = {"by": by, "best": best, "runner_up": None, "distinguishable": None}
    out["order"] = done["cell"].tolist()  # best first, worst last (same ranking everywhere)
    if len(done) > 1:
        runner = done.iloc[1].to_dict()
        out["runner_up"] = runner
        if any(math.isnan(x) for x in (best["mae_lo"], runner["mae_lo"])):
            out["distinguishable"] = None  # no intervals: cannot say
        else:
            overlap = best["mae_lo"] <= runner["mae_hi"] and runner["mae_lo"] <= best["mae_hi"]
            out["distinguishable"] = not overlap
    return out


def missing_report(df: pd.DataFrame, cells: pd.DataFrame, design: Design) -> list[str]:
    """What the study lacks: cells with no result, missing replicates, failures."""
    out = []
    n_complete = int((df["state"] == "COMPLETE").sum())
    if design.planned is not None and n_complete < design.planned:
        out.append(
            f"{design.planned - n_complete} of {design.planned} planned trials have no result"
        )
    for c in cells.itertuples():
        problems = []
        if c.n == 0:
            problems.append("no completed run")
        elif design.sampler == "grid" and design.seeds and c.n < len(design.seeds):
            have = {str(s) for s in c.seeds}
            lack = [str(s) for s in design.seeds if str(s) not in have]
            problems.append(f"missing seed(s) {', '.join(lack)}")
        for state in ("fail", "pruned", "killed", "running"):
            k = getattr(c, state)
            if k:
                problems.append(f"{k} {state if state != 'fail' else 'failed'}")
        if problems:
            out.append(f"{c.cell}: {'; '.join(problems)}")
    reasons = df.loc[df["state"] == "FAIL", "reason"].fillna("").replace("", "no reason")
    for reason, k in reasons.value_counts().items():
        out.append(f"failure reason ({k}×): {str(reason)[:200]}")
    return out


# ----------------------------------------------------------------------------- verdict


def _p(p: float) -> str:
    """``p = 0.012`` / ``p < 0.001`` (the relation included)."""
    if not math.isfinite(p):
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _y(x: float) -> str:
    return f"{x:.2f}"


def conf_label(confidence: float) -> str:
    """``95 %``, ``97.5 %``: one spelling for every interval level in the report."""
    return f"{100 * confidence:.4g} %"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def verdict(a: Analysis) -> list[str]:
    """Plain sentences, each backed by a number in the tables; never more than they support."""
    design, df = a.design, a.runs
    c = conf_label(a.confidence)
    complete = a.complete
    out: list[str] = []
    counts = {s: int((df["state"] == s).sum()) for s in STATES}
    n_cells = int((a.cells["n"] > 0).sum())
    scope = (
        f"Based on {counts['COMPLETE']} completed trial(s) in {n_cells} cell(s)"
        + (f" of {design.planned} planned" if design.planned else "")
        + "."
    )
    lost = [
        f"{counts[s]} {w}"
        for s, w in (
            ("FAIL", "failed"),
            ("PRUNED", "pruned"),
            ("KILLED", "lost to a crash"),
            ("RUNNING", "still running"),
        )
        if counts[s]
    ]
    if lost:
        scope = scope[:-1] + f"; {', '.join(lost)}."
    out.append(scope)
    if counts["COMPLETE"] == 0:
        out.append("No trial has completed yet: nothing can be concluded.")
        return out
    single = a.cells[(a.cells["n"] == 1)]
    if len(single):
        out.append(
            f"{len(single)} of {n_cells} cell(s) have a single replicate: no confidence interval "
            "for them, and comparisons rest only on pairs across the other factors — add seeds "
            "(search.seeds) to replicate."
        )

    # Paired comparisons (pooled over the other factors and seeds).
    for r in a.comparisons.itertuples():
        what = f"{r.factor} = {r.level_b} instead of {r.level_a}"
        if r.n_pairs >= 2 and not math.isfinite(r.p) and math.isfinite(r.diff):
            out.append(
                f"{what}: all {r.n_pairs} matched pairs differ by exactly {r.diff:+.2f} years — "
                "no variation to test (identical runs?)."
            )
            continue
        if r.n_pairs < 2 or not math.isfinite(r.p):
            out.append(
                f"{what}: cannot be tested — {r.n_pairs} matched pair(s) "
                "(same seed and other choices); add replicates."
            )
            continue
        basis = f"{r.n_pairs} pairs" + (f": {r.strata}" if r.strata else "")
        if r.significant:
            direction = "lowered" if r.diff < 0 else "raised"
            lo, hi = (-r.hi, -r.lo) if r.diff < 0 else (r.lo, r.hi)
            out.append(
                f"{what} {direction} test MAE by {_y(abs(r.diff))} years ({c} CI "
                f"{_y(lo)} to {_y(hi)}, Holm-adjusted {_p(r.p_holm)}, {basis})."
            )
            continue
        text = (
            f"{what}: no detectable difference in test MAE ({r.diff:+.2f} years, {c} CI "
            f"{_y(r.lo)} to {_y(r.hi)}, Holm-adjusted {_p(r.p_holm)}, {basis})"
        )
        if r.lo > 0 or r.hi < 0:
            text += (
                "; the unadjusted interval excludes 0, but the difference does not survive the "
                "correction for the report's other tests: borderline, replicate before relying "
                "on it"
            )
        main = None
        if a.anova is not None:
            hit = a.anova[(a.anova["term"] == r.factor) & a.anova["significant"]]
            main = None if hit.empty else hit.iloc[0]
        if main is not None:
            interacts = a.anova[
                a.anova["interaction"]
                & a.anova["significant"]
                & a.anova["term"].str.split(" × ").apply(lambda t, f=r.factor: f in t)
            ]
            text += (
                f"; the ANOVA does detect an effect of {r.factor} (F-test, Holm-adjusted "
                f"{_p(main['p_holm'])}, η² = {main['eta_sq']:.2f})"
            )
            if len(interacts):
                text += (
                    f", whose size depends on {', '.join(interacts['term'])}: see the "
                    "per-level comparisons"
                )
            else:
                text += ": the two tests disagree, so the evidence is borderline"
        out.append(text + ".")

    # Interactions.
    if a.anova is not None:
        inter = a.anova[a.anova["interaction"]]
        for r in inter.itertuples():
            if r.significant:
                f1, f2 = r.term.split(" × ")
                parts = a.simple_effects[
                    (a.simple_effects["factor"] == f1)
                    & a.simple_effects["at"].str.startswith(f2 + "=")
                ]
                detail = "; ".join(
                    f"at {s.at}: {s.level_b} − {s.level_a} = {s.diff:+.2f} "
                    f"({_y(s.lo)} to {_y(s.hi)})"
                    for s in parts.itertuples()
                )
                out.append(
                    f"The effect of {f1} depends on {f2} (interaction F-test, Holm-adjusted "
                    f"{_p(r.p_holm)}, η² = {r.eta_sq:.2f})" + (f": {detail}." if detail else ".")
                )
        quiet = inter[~inter["significant"]]
        if len(quiet):
            out.append(
                "No detectable interaction: "
                + ", ".join(quiet["term"])
                + f" (smallest Holm-adjusted {_p(float(quiet['p_holm'].min()))})."
            )
        tested = set(a.comparisons["factor"])
        for r in a.anova[~a.anova["interaction"] & ~a.anova["block"]].itertuples():
            if r.term in tested:
                continue  # said above, with its paired comparison
            # Numeric covariates, and factors without matched pairs (random search).
            if r.significant:
                out.append(
                    f"{r.term} affects test MAE (F-test, Holm-adjusted {_p(r.p_holm)}, "
                    f"η² = {r.eta_sq:.2f})."
                )
            else:
                out.append(
                    f"{r.term}: no detectable effect on test MAE (F-test, Holm-adjusted "
                    f"{_p(r.p_holm)})."
                )
    elif a.anova_note:
        out.append(f"No ANOVA: {a.anova_note}.")
    if a.importances:
        top = sorted(a.importances.items(), key=lambda kv: -kv[1])
        out.append(
            "fANOVA importance for test MAE: "
            + ", ".join(f"{design.label(k)} {v:.2f}" for k, v in top)
            + " (descriptive: no test behind it)."
        )

    # Best cell.
    b = a.best
    if b:
        best = b["best"]
        by = "calib MAE" if b["by"] == "calib_mae" else "test MAE"
        ci = (
            f", {c} CI {_y(best['mae_lo'])}–{_y(best['mae_hi'])}"
            if math.isfinite(best["mae_lo"])
            else ""
        )
        text = (
            f"Best cell by {by}: {best['cell']}, test MAE {_y(best['mae'])} years{ci} "
            f"({best['n']} replicate(s))."
        )
        runner = b["runner_up"]
        if runner is not None:
            if b["distinguishable"] is None:
                text += (
                    f" Runner-up {runner['cell']} ({_y(runner['mae'])}): too few replicates "
                    "to tell them apart."
                )
            elif not b["distinguishable"]:
                text += (
                    f" Runner-up {runner['cell']} ({_y(runner['mae'])}, CI "
                    f"{_y(runner['mae_lo'])}–{_y(runner['mae_hi'])}) is not distinguishable "
                    "from it (the intervals overlap)."
                )
            else:
                text += (
                    f" Its test-MAE interval does not overlap the runner-up's ({runner['cell']}, "
                    f"{_y(runner['mae'])}, CI {_y(runner['mae_lo'])}–{_y(runner['mae_hi'])})."
                )
        out.append(text)

    # Coverage rule of thumb.
    cov = a.coverage
    if cov["n"]:
        fits = {
            "normal": "consistent with normal residuals, not with Laplace",
            "laplace": "consistent with Laplace residuals, not with normal",
            "both": "the interval contains both predictions: cannot tell them apart",
            "between": "between the two predictions, consistent with neither",
            "below": "below both predictions: fewer errors fall within the MAE than normal or "
            "Laplace residuals would give (look for bias or a spread-out error distribution)",
            "above": "above both predictions: errors are more concentrated than even Laplace "
            "residuals give (a sharp peak with heavy tails)",
            "too few runs": "one run only: no interval",
        }[cov["fits"]]
        ci = f" ({c} CI {_pct(cov['lo'])}–{_pct(cov['hi'])})" if cov["n"] > 1 else ""
        vs = ", ".join(f"{k} {v}" for k, v in cov["verdicts"].items())
        out.append(
            f"Across {cov['n']} run(s) the share of test errors within the MAE averaged "
            f"{_pct(cov['mean'])}{ci}; normal residuals predict {_pct(NORMAL_CS_AT_MAE)}, "
            f"Laplace {_pct(LAPLACE_CS_AT_MAE)}: {fits}. {cov['closer_to_normal']} of "
            f"{cov['n']} runs are closer to the normal prediction. Per-run shape verdicts: {vs}."
        )
    if len(complete) and complete["mae"].notna().any() and design.sampler == "tpe":
        out.append(
            "TPE chooses cells adaptively: cells are not replicated evenly, so comparisons "
            "rest on whatever pairs it happened to run."
        )
    return out


# ----------------------------------------------------------------------- from the store


def design_from_parent(params: dict[str, str]) -> Design:
    """The design from a study's parent-run params (``search.space`` is JSON)."""
    try:
        space = json.loads(params.get("search.space", "{}"))
        seeds = json.loads(params.get("search.seeds", "[0]"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"the study's parent run has unreadable search params: {exc}") from None
    n_trials = params.get("search.n_trials")
    return Design.from_space(
        space,
        seeds,
        sampler=params.get("search.sampler", "grid"),
        n_trials=int(n_trials) if n_trials not in (None, "None", "") else None,
    )


def _typed(value: str | None, key: str, design: Design) -> Any:
    if value is None:
        return math.nan
    if key in design.numeric:
        try:
            return float(value)
        except ValueError:
            return math.nan
    levels = design.levels.get(key, [])
    by_text = {str(v): v for v in levels}
    if value in by_text:
        return by_text[value]
    # Logged params are the validated config's values: 0 may come back as "0.0", a list as
    # JSON. Match by value before giving up.
    for v in levels:
        if isinstance(v, bool | str):
            continue
        with contextlib.suppress(ValueError, TypeError):
            if isinstance(v, int | float) and float(value) == float(v):
                return v
            if json.loads(value) == v:
                return v
    return value


def runs_table(runs: list, design: Design) -> pd.DataFrame:
    """MLflow trial runs → one row per planned trial (a retried trial keeps its best attempt)."""
    from agelab.tracking import TAG_REASON, TAG_STATE

    status_state = {"FINISHED": "COMPLETE", "FAILED": "FAIL", "KILLED": "KILLED"}
    rows = []
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        state = tags.get(TAG_STATE) or status_state.get(run.info.status, run.info.status)
        if state == "FAIL" and run.info.status == "KILLED":
            state = "KILLED"  # a dead worker's trial: re-queued, not a failure of the cell
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "start_time": run.info.start_time or 0,
            "status": run.info.status,
            "state": state,
            "reason": tags.get(TAG_REASON, ""),
            "verdict": tags.get("agelab.verdict", ""),
            "plan_key": tags.get("agelab.plan_key", run.info.run_id),
        }
        # A run killed before its params were logged still names its trial in the plan key.
        planned = dict(part.split("=", 1) for part in row["plan_key"].split(" | ") if "=" in part)
        seed = params.get("trial.seed", tags.get("agelab.replicate", planned.get("seed")))
        row["seed"] = _typed(seed, "seed", design)
        for key in design.keys:  # the plan key holds the raw choice: match it first
            row[key] = _typed(planned.get(key, params.get(key)), key, design)
        row |= {k: float(v) for k, v in metrics.items()}
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    rank = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "KILLED": 4}
    df["_rank"] = df["state"].map(rank).fillna(5)
    # Grid/random: a plan key is one planned trial, retried after a crash. TPE may sample the
    # same cell and seed again on purpose: every completed TPE run counts.
    df["_key"] = df["plan_key"]
    if design.sampler == "tpe":
        done = df["state"] == "COMPLETE"
        df.loc[done, "_key"] = df.loc[done, "run_id"]
    df = df.sort_values(["_key", "_rank", "start_time"], ascending=[True, True, False])
    df["attempts"] = df.groupby("_key")["run_id"].transform("size")
    df = df.drop_duplicates("_key", keep="first").drop(columns=["_rank", "_key"])
    for col in ("mae", "best_calib_mae", "calib_mae"):
        if col not in df.columns:
            df[col] = math.nan
    return df.sort_values("start_time").reset_index(drop=True)


@dataclass
class ReportResult:
    analysis: Analysis
    folder: Path
    markdown: Path
    html: Path
    parent_run_id: str | None


def build_report(
    study: str,
    tracking: TrackingConfig,
    report: ReportConfig | None = None,
    *,
    experiment: str | None = None,
    out_dir: Path | None = None,
    log: bool = True,
) -> ReportResult:
    """Read a study's runs, analyse them, write ``report.md`` / ``report.html`` + figures to
    ``<tracking.root>/reports/<study>/`` and log them on the study's latest parent run."""
    from agelab import report_render
    from agelab.study import param_importances
    from agelab.tracking import TAG_KIND, TAG_STUDY, Tracker

    report = report or ReportConfig()
    tracker = Tracker(tracking, experiment or study, create=False)
    runs = tracker.search(f"tags.`{TAG_STUDY}` = '{study}'")
    parents = [r for r in runs if r.data.tags.get(TAG_KIND) == "study"]
    trials = [r for r in runs if r.data.tags.get(TAG_KIND) == "trial"]
    if not parents:
        raise ReportError(
            f"no runs of study {study!r} in {tracker.experiment_name!r} at "
            f"{tracker.display_uri}: run it first (agelab run <config>), or point "
            "tracking.root / MLFLOW_TRACKING_URI at the store that has it"
        )
    parent = max(parents, key=lambda r: r.info.start_time or 0)
    design = design_from_parent(parent.data.params)
    table = runs_table(trials, design)
    if table.empty:
        table = pd.DataFrame(columns=[*design.keys, "seed", "mae", "state"])
    importances = None
    if design.sampler != "grid" and len(design.keys) >= 1:
        done = table[table["state"] == "COMPLETE"]
        importances = param_importances(
            json.loads(parent.data.params.get("search.space", "{}")),
            done[design.keys].to_dict("records"),
            done["mae"].astype(float).tolist(),
        )
    analysis = analyse(
        table,
        design,
        alpha=report.alpha,
        confidence=report.confidence,
        importances=importances,
    )
    folder = Path(out_dir) if out_dir else tracking.root / "reports" / study
    cs_curves = _cs_curves(tracker, analysis) if report.figures else {}
    meta = {
        "study": study,
        "experiment": tracker.experiment_name,
        "store": tracker.display_uri,
        "parent_run": parent.info.run_id,
        "sampler": design.sampler,
        "config_hash": parent.data.tags.get("agelab.config_hash", ""),
        "git_commit": parent.data.tags.get("agelab.git_commit", ""),
        "dataset": parent.data.tags.get("agelab.dataset_fingerprint", "")[:12],
        "device": parent.data.tags.get("agelab.device", ""),
        "description": parent.data.tags.get("mlflow.note.content", ""),
    }
    md, html = report_render.write(
        analysis, folder, meta=meta, figures=report.figures, cs_curves=cs_curves
    )
    if log:
        tracker.log_artifacts(parent.info.run_id, folder, "report")
    return ReportResult(analysis, folder, md, html, parent.info.run_id)


def _cs_curves(tracker, analysis: Analysis) -> dict[str, pd.DataFrame]:
    """Mean CS curve (observed and predicted) of the best and worst cells' runs."""
    import tempfile

    if analysis.best is None or "run_id" not in analysis.runs:
        return {}
    order = analysis.best["order"]
    cells = analysis.cells.set_index("cell")
    picks = {"best": cells.loc[order[0]]}
    if len(order) > 1:
        picks["worst"] = cells.loc[order[-1]]
    keys = analysis.design.keys
    done = analysis.complete
    out = {}
    for which, cell in picks.items():
        mask = np.ones(len(done), dtype=bool)
        for k in keys:
            mask &= (done[k].astype(str) == str(cell[k])).to_numpy()
        curves = []
        with tempfile.TemporaryDirectory(prefix="agelab-report-") as scratch:
            for run_id in done.loc[mask, "run_id"]:
                path = tracker.download_artifact(run_id, "cs_curve.csv", Path(scratch) / run_id)
                if path is not None:
                    curves.append(pd.read_csv(path))
        if curves:
            mean = pd.concat(curves).groupby("k", as_index=False).mean()
            mean.attrs["cell"] = cell.name
            mean.attrs["n"] = len(curves)
            out[which] = mean
    return out


def report_for_config(cfg: StudyConfig, **kwargs: Any) -> ReportResult:
    return build_report(
        cfg.name, cfg.tracking, cfg.report, experiment=cfg.tracking.experiment, **kwargs
    )

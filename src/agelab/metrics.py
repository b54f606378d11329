"""Residual diagnostics for age regression: point metrics, coverage, normality, conformal.

Everything here is a pure function of numpy arrays (numpy, scipy, statsmodels, pandas only).
The conventions and formulas, in one place:

Residual
    ``e = prediction - truth`` in years; ``|e|`` is the absolute error.

Point metrics
    MAE = mean|e|, RMSE = sqrt(mean e^2), median absolute error, bias = mean e,
    R^2 = 1 - sum e^2 / sum (y - mean y)^2, Pearson r between truth and prediction.

Cumulative score (coverage) curve
    CS(k) = share of cases with ``|e| <= k`` (Geng et al. 2007 call it the "cumulative
    score"). "Years needed for p coverage" is the smallest k with CS(k) >= p, i.e. the
    inverted-CDF empirical quantile of ``|e|``.

Coverage predicted from the MAE alone (both models assume residuals centred on 0)
    * normal residuals ``e ~ N(0, s)``: E|e| = s*sqrt(2/pi), so s = MAE*sqrt(pi/2) and
      CS(k) = 2*Phi(k/s) - 1. At k = MAE this is 2*Phi(sqrt(2/pi)) - 1 = erf(1/sqrt(pi))
      = 0.5751 whatever the MAE (the half-normal distribution, Johnson, Kotz & Balakrishnan,
      *Continuous Univariate Distributions* vol. 1, ch. 13).
    * Laplace residuals ``e ~ Laplace(0, b)``: E|e| = b, so b = MAE and |e| is exponential
      with mean b: CS(k) = 1 - exp(-k/b); CS(MAE) = 1 - 1/e = 0.6321.
    * "normal fit": ``e ~ N(bias, sd)`` with the sample bias and standard deviation, so
      CS(k) = Phi((k - bias)/sd) - Phi((-k - bias)/sd).
    The gap of a theory curve is the Kolmogorov-Smirnov distance sup_k |CS_obs(k) - CS(k)|
    over all k >= 0, computed exactly at the jumps of the observed step function.

Normality diagnostics
    Moment skewness and excess kurtosis; Shapiro-Wilk (on a seeded subsample of at most 5,000
    points, the range where its p-value is accurate); D'Agostino-Pearson K^2 (n >= 8);
    Anderson-Darling A^2 for the normal with estimated mean and sd, with the 5 % critical value
    0.787 / (1 + 4/n - 25/n^2) (Stephens 1974; D'Agostino & Stephens 1986, table 4.7 -- the
    values scipy tabulates); Jarque-Bera; Lilliefors (KS with estimated parameters,
    statsmodels). Maximum-likelihood fits: normal (mean, sd with ddof=0) and Laplace (median,
    mean absolute deviation from the median), with log-likelihoods and the AIC difference
    (both models have two parameters, so AIC_normal - AIC_laplace = 2*(ll_laplace - ll_normal)).

Verdict (a string, see :func:`normality`)
    1. Fewer than 20 residuals or (numerically) constant residuals: ``undetermined``.
    2. The model with the lower AIC is the candidate.
    3. Body check: the KS distance between the residuals and the fitted candidate must be at
       most ``max(0.03, 1.07/sqrt(n))``. 1.07/sqrt(n) is about the 1 % critical value of a
       KS test with estimated parameters (Lilliefors' table gives 1.031/sqrt(n) for the
       normal; Monte Carlo gives about 1.07/sqrt(n) for the Laplace fit used here); 0.03 is a
       practical tolerance (3 percentage points on the CDF) so that huge samples are not
       failed for irrelevant misfit.
    4. Tail check: the share of residuals outside the candidate's central 99 % interval must
       not be both more than twice the nominal 1 % and significantly above it (one-sided
       binomial p < 0.01).
    Passing both gives ``normal`` or ``laplace``; failing either gives ``heavy-tailed``,
    which means "neither model describes the residuals" -- usually outliers / tails heavier
    than Laplace, but also skew or light tails; ``verdict_reason`` says which.

Heteroscedasticity
    Breusch-Pagan in Koenker's studentised form: n*R^2 of the auxiliary OLS regression of e^2
    on [1, true age], chi^2(1) p-value (statsmodels ``het_breuschpagan(robust=True)``), plus
    the OLS slope of |e| on true age (years of extra absolute error per year of age).

Split-conformal intervals (Vovk et al. 2005; Lei et al. 2018)
    With calibration scores s_i = |e_i| (n of them), the half-width for coverage 1 - alpha is
    the ceil((n + 1)(1 - alpha))-th smallest score (infinite if that rank exceeds n); the
    interval is prediction +- q, width 2q. The band variant ("Mondrian" conformal) does the
    same within age bands of the *predicted* age (the truth is unknown at prediction time),
    pooling bands with too few calibration points with their neighbours (or, optionally,
    falling back to the global q -- which under-covers the extreme predicted ages, where the
    largest errors land).

Undefined statistics are reported as NaN with the reason in ``notes``; scipy/numpy warnings are
suppressed inside this module (the NaN + note is the report).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import special, stats

__all__ = [
    "COVERAGE_KS",
    "LAPLACE_CS_AT_MAE",
    "METRIC_DOCS",
    "NORMAL_CS_AT_MAE",
    "VERDICT_CODES",
    "YEARS_FOR",
    "ConformalInterval",
    "Diagnostics",
    "MetricSet",
    "NormalityResult",
    "age_band_table",
    "conformal_intervals",
    "conformal_quantile",
    "coverage_summary",
    "cs_curve",
    "decade_edges",
    "evaluate",
    "metric_names",
    "normality",
    "point_metrics",
]

# ----------------------------------------------------------------------------- constants

#: CS(MAE) if residuals are normal with mean 0: 2*Phi(sqrt(2/pi)) - 1 = erf(1/sqrt(pi)).
NORMAL_CS_AT_MAE: float = float(special.erf(1.0 / math.sqrt(math.pi)))
#: CS(MAE) if residuals are Laplace with location 0: 1 - 1/e.
LAPLACE_CS_AT_MAE: float = float(1.0 - math.exp(-1.0))

#: k (years) at which ``coverage_at_<k>`` is always reported.
COVERAGE_KS: tuple[int, ...] = tuple(range(1, 11))
#: Coverage targets (percent) for ``years_for_<p>``.
YEARS_FOR: tuple[int, ...] = (50, 80, 90, 95)
DEFAULT_CONFORMAL_LEVELS: tuple[float, ...] = (0.8, 0.9, 0.95)

VERDICT_CODES: dict[str, float] = {
    "normal": 0.0,
    "laplace": 1.0,
    "heavy-tailed": 2.0,
    "undetermined": math.nan,
}

#: Values further than this from 0 are rejected: ages are in years, so such values are a unit
#: or overflow bug, and they would overflow the sums of squares.
MAX_ABS_VALUE = 1e9
#: Resolution in years: spreads below this count as constant, and |e| <= k is tested with
#: this slack so that e.g. 31.1 - 30.1 = 1.0000000000000036 counts as "within 1 year".
TOL = 1e-9

SHAPIRO_MAX_N = 5000
DAGOSTINO_MIN_N = 8
ANDERSON_MIN_N = 8
LILLIEFORS_MIN_N = 4
VERDICT_MIN_N = 20
VERDICT_KS_TOLERANCE = 0.03
VERDICT_KS_C = 1.07
VERDICT_TAIL_LEVEL = 0.99
VERDICT_TAIL_MAX_RATIO = 2.0
VERDICT_TAIL_P = 0.01
ANDERSON_CRIT_5_ASYMPTOTIC = 0.787


def _pct(level: float) -> str:
    """0.9 -> '90', 0.975 -> '97.5' (for metric names)."""
    return f"{level * 100:.10g}"


def _conformal_docs(levels: Sequence[float]) -> dict[str, str]:
    docs = {}
    for lv in levels:
        p = _pct(lv)
        docs[f"conformal_{p}_coverage"] = (
            f"test share inside the split-conformal {p}% interval (global calib quantile)"
        )
        docs[f"conformal_{p}_width"] = (
            f"width (2q, years) of the global split-conformal {p}% interval"
        )
        docs[f"conformal_band_{p}_coverage"] = (
            f"test share inside the {p}% interval with q per predicted-age band"
        )
        docs[f"conformal_band_{p}_width"] = (
            f"mean width (years) of the {p}% interval with q per predicted-age band"
        )
    return docs


METRIC_DOCS: dict[str, str] = {
    # point metrics
    "n": "number of test cases",
    "mae": "mean absolute error, mean |pred - true| (years)",
    "rmse": "root mean squared error (years)",
    "medae": "median absolute error (years)",
    "bias": "mean residual, mean(pred - true) (years); > 0 means over-estimated ages",
    "resid_sd": "sample standard deviation of the residuals (ddof=1, years)",
    "max_abs_error": "largest absolute error (years)",
    "r2": "coefficient of determination 1 - SS_res/SS_tot",
    "pearson_r": "Pearson correlation between true and predicted age",
    # coverage
    "coverage_at_mae": "observed share with |residual| <= MAE",
    "coverage_at_mae_normal": "CS(MAE) predicted by normal residuals: 2*Phi(sqrt(2/pi))-1 = 0.5751",
    "coverage_at_mae_laplace": "CS(MAE) predicted by Laplace residuals: 1 - 1/e = 0.6321",
    "coverage_at_mae_normal_fit": "CS(MAE) predicted by N(bias, resid_sd)",
    **{f"coverage_at_{k}": f"observed share with |residual| <= {k} years" for k in COVERAGE_KS},
    "cs_gap_normal": "max |observed CS(k) - normal-from-MAE CS(k)| over all k >= 0 (KS distance)",
    "cs_gap_laplace": "max |observed CS(k) - Laplace-from-MAE CS(k)| over all k >= 0",
    "cs_gap_normal_fit": "max |observed CS(k) - CS(k) of N(bias, resid_sd)| over all k >= 0",
    **{f"years_for_{p}": f"smallest k with observed CS(k) >= {p}% (years)" for p in YEARS_FOR},
    **{
        f"years_for_{p}_normal": f"years for {p}% coverage predicted from MAE, normal residuals"
        for p in YEARS_FOR
    },
    **{
        f"years_for_{p}_laplace": f"years for {p}% coverage predicted from MAE, Laplace residuals"
        for p in YEARS_FOR
    },
    # normality
    "skewness": "moment skewness of the residuals (0 for symmetric)",
    "excess_kurtosis": "moment excess kurtosis (normal 0, Laplace 3)",
    "shapiro_stat": "Shapiro-Wilk W (seeded subsample of at most 5000)",
    "shapiro_p": "Shapiro-Wilk p-value (small = not normal)",
    "dagostino_stat": "D'Agostino-Pearson K^2 (skewness + kurtosis test, n >= 8)",
    "dagostino_p": "D'Agostino-Pearson p-value",
    "anderson_stat": "Anderson-Darling A^2 against the fitted normal",
    "anderson_crit_5": "5% critical value for anderson_stat (reject normality if exceeded)",
    "jarque_bera_stat": "Jarque-Bera statistic",
    "jarque_bera_p": "Jarque-Bera p-value",
    "lilliefors_stat": "Lilliefors KS distance to the normal with estimated mean/sd",
    "lilliefors_p": "Lilliefors p-value (tabulated)",
    "ks_normal_fit": "KS distance between residuals and the ML normal fit (verdict body check)",
    "ks_laplace_fit": "KS distance between residuals and the ML Laplace fit (verdict body check)",
    "tail_ratio_normal": "share outside the fitted normal's central 99% interval / 1%",
    "tail_ratio_laplace": "share outside the fitted Laplace's central 99% interval / 1%",
    "loglik_normal": "maximised log-likelihood of a normal (mean, sd MLE)",
    "loglik_laplace": "maximised log-likelihood of a Laplace (median, mean abs deviation)",
    "aic_normal_minus_laplace": "AIC_normal - AIC_laplace; > 0 favours Laplace",
    "verdict_code": "shape verdict: 0 normal, 1 laplace, 2 heavy-tailed (NaN: undetermined)",
    "bp_stat": "Breusch-Pagan LM (Koenker) of squared residual on true age",
    "bp_p": "Breusch-Pagan p-value (small = error size depends on age)",
    "hetero_slope": "OLS slope of |residual| on true age (years of error per year of age)",
    # conformal
    "n_calib": "number of calibration cases (NaN if no calibration split)",
    **_conformal_docs(DEFAULT_CONFORMAL_LEVELS),
}


def metric_names(conformal_levels: Sequence[float] = DEFAULT_CONFORMAL_LEVELS) -> list[str]:
    """The scalar names :func:`evaluate` returns for these conformal levels, in order."""
    base = [k for k in METRIC_DOCS if not k.startswith("conformal_")]
    return base + list(_conformal_docs(conformal_levels))


# ----------------------------------------------------------------------------- helpers


class MetricSet(dict[str, float]):
    """A ``{name: float}`` dict plus ``notes``: ``{name: why it is NaN / caveat}``."""

    def __init__(self, values: dict[str, float] | None = None, notes: dict[str, str] | None = None):
        super().__init__(values or {})
        self.notes: dict[str, str] = dict(notes or {})

    def put(self, name: str, value: float, note: str | None = None) -> None:
        self[name] = float(value)
        if note:
            self.notes[name] = note

    def nan(self, names: str | Sequence[str], note: str) -> None:
        for name in [names] if isinstance(names, str) else names:
            self.put(name, math.nan, note)

    def merge(self, other: MetricSet) -> None:
        self.update(other)
        self.notes.update(other.notes)


@contextlib.contextmanager
def _quiet_ctx() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            yield


def _quiet(fn: Callable) -> Callable:
    """Run ``fn`` with numpy/scipy/statsmodels warnings suppressed (NaN + note instead)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _quiet_ctx():
            return fn(*args, **kwargs)

    return wrapper


def _as_1d(x: object, name: str, limit: float = MAX_ABS_VALUE) -> np.ndarray:
    """Validate one input array: numeric, 1-D (or a column), non-empty, finite, sane scale."""
    if x is None:
        raise ValueError(f"{name} is None")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. complex -> float discarding imaginary parts
            a = np.asarray(x, dtype=float)
    except (TypeError, ValueError, Warning) as exc:
        raise ValueError(f"{name} must be numeric ages in years ({exc})") from None
    if a.ndim == 2 and 1 in a.shape:  # model outputs often come as an [n, 1] column
        a = a.reshape(-1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    bad = ~np.isfinite(a)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf); "
            f"first at index {first}"
        )
    big = np.abs(a) > limit
    if big.any():
        first = int(np.flatnonzero(big)[0])
        raise ValueError(
            f"{name} contains {int(big.sum())} value(s) beyond +-{limit:g} years "
            f"(first at index {first}: {a[first]:g}); check units / overflow"
        )
    return a


def _check_pair(
    y_true: object, y_pred: object, true_name: str, pred_name: str, min_n: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    t = _as_1d(y_true, true_name)
    p = _as_1d(y_pred, pred_name)
    if t.size != p.size:
        raise ValueError(
            f"length mismatch: {true_name} has {t.size} values but {pred_name} has {p.size}"
        )
    if t.size < min_n:
        raise ValueError(
            f"too few points: {true_name}/{pred_name} have {t.size}, need at least {min_n}"
        )
    return t, p


def _check_residuals(residuals: object, name: str = "residuals") -> np.ndarray:
    e = _as_1d(residuals, name, limit=2 * MAX_ABS_VALUE)  # a difference of two ages
    if e.size < 3:
        raise ValueError(f"too few points: {name} has {e.size}, need at least 3")
    return e


def _is_constant(x: np.ndarray) -> bool:
    """True if the spread of ``x`` is below the resolution TOL (relative for large values)."""
    return float(np.ptp(x)) <= TOL * max(1.0, float(np.max(np.abs(x))))


def _check_k_max(k_max: object) -> int:
    if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)) or k_max < 1:
        raise ValueError(f"k_max must be a positive integer, got {k_max!r}")
    return int(k_max)


def _check_levels(levels: object) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in levels)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(
            f"conformal_levels must be a sequence of numbers, got {levels!r}"
        ) from None
    if not out or any(not (0.0 < v < 1.0) for v in out):
        raise ValueError(f"conformal_levels must be non-empty and in (0, 1), got {levels!r}")
    return out


def _check_edges(edges: object, name: str = "age_bands") -> np.ndarray:
    try:
        e = np.asarray(edges, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of band edges, got {edges!r}") from None
    if e.size < 2 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ValueError(
            f"{name} must hold at least 2 finite, strictly increasing edges, got {edges!r}"
        )
    return e


# ----------------------------------------------------------------------------- point metrics


@_quiet
def point_metrics(y_true: object, y_pred: object) -> MetricSet:
    """MAE, RMSE, median absolute error, bias, residual sd, max error, R^2, Pearson r."""
    t, p = _check_pair(y_true, y_pred, "y_true", "y_pred")
    e = p - t
    a = np.abs(e)
    out = MetricSet()
    out.put("n", t.size)
    out.put("mae", a.mean())
    out.put("rmse", math.sqrt(float(np.mean(e * e))))
    out.put("medae", np.median(a))
    out.put("bias", e.mean())
    out.put("resid_sd", e.std(ddof=1))
    out.put("max_abs_error", a.max())
    tc = t - t.mean()
    pc = p - p.mean()
    if _is_constant(t):
        out.nan("r2", "y_true is constant: R^2 undefined (zero variance of the truth)")
    else:
        out.put("r2", 1.0 - float(np.sum(e * e)) / float(np.sum(tc * tc)))
    if _is_constant(t) or _is_constant(p):
        which = "y_true" if _is_constant(t) else "y_pred"
        out.nan("pearson_r", f"{which} is constant: correlation undefined")
    else:
        r = float(np.sum(tc * pc)) / math.sqrt(float(np.sum(tc * tc)) * float(np.sum(pc * pc)))
        out.put("pearson_r", min(1.0, max(-1.0, r)))
    return out


# ----------------------------------------------------------------------------- coverage


@dataclass(frozen=True)
class _AbsModel:
    """Distribution of |e| for e ~ N(mu, sigma) or e ~ Laplace(0, b); scale 0 = point mass."""

    kind: str  # "normal" or "laplace"
    scale: float
    mu: float = 0.0

    def cdf(self, k: np.ndarray) -> np.ndarray:
        """P(|e| <= k) for k >= 0."""
        k = np.asarray(k, dtype=float)
        if self.scale <= 0:  # point mass at |mu|
            return (k >= abs(self.mu)).astype(float)
        if self.kind == "laplace":
            return -np.expm1(-k / self.scale)
        return special.ndtr((k - self.mu) / self.scale) - special.ndtr((-k - self.mu) / self.scale)

    def cdf_left(self, k: np.ndarray) -> np.ndarray:
        """P(|e| < k): differs from cdf only at the atom of a point mass."""
        if self.scale <= 0:
            return (np.asarray(k, dtype=float) > abs(self.mu)).astype(float)
        return self.cdf(k)

    def atoms(self) -> list[float]:
        return [abs(self.mu)] if self.scale <= 0 else []

    def quantile(self, p: float) -> float:
        """Smallest k with P(|e| <= k) >= p (only used for mu = 0)."""
        if self.scale <= 0:
            return abs(self.mu)
        if self.kind == "laplace":
            return -self.scale * math.log1p(-p)
        return self.scale * float(special.ndtri((1.0 + p) / 2.0))


def _theory_models(e: np.ndarray) -> dict[str, _AbsModel]:
    mae = float(np.mean(np.abs(e)))
    sd = 0.0 if _is_constant(e) else float(e.std(ddof=1))
    return {
        "normal": _AbsModel("normal", mae * math.sqrt(math.pi / 2.0)),
        "laplace": _AbsModel("laplace", mae),
        "normal_fit": _AbsModel("normal", sd, float(e.mean())),
    }


def _share_within(abs_sorted: np.ndarray, k: np.ndarray | float) -> np.ndarray:
    """Observed CS(k) = share of |e| <= k (with TOL slack), from sorted |e|."""
    k = np.asarray(k, dtype=float)
    return np.searchsorted(abs_sorted, k + TOL, side="right") / abs_sorted.size


def _sup_gap(abs_sorted: np.ndarray, model: _AbsModel) -> float:
    """Exact sup_{k >= 0} |CS_obs(k) - model CDF(k)|.

    Both are non-decreasing step/continuous functions, so the supremum is attained at (or just
    before) a jump: the distinct observed |e| values and the model's atoms. Between jumps the
    observed curve is flat and the model monotone, so nothing else can be larger.
    """
    n = abs_sorted.size
    u, counts = np.unique(abs_sorted, return_counts=True)
    cum = np.cumsum(counts) / n  # CS_obs(u)
    before = cum - counts / n  # CS_obs(u-)
    gap = max(
        float(np.max(np.abs(cum - model.cdf(u)))),
        float(np.max(np.abs(before - model.cdf_left(u)))),
    )
    for c in model.atoms():
        right = np.searchsorted(abs_sorted, c, side="right") / n
        left = np.searchsorted(abs_sorted, c, side="left") / n
        gap = max(gap, abs(right - float(model.cdf(c))), abs(left - float(model.cdf_left(c))))
    return gap


@_quiet
def cs_curve(residuals: object, k_max: int = 15) -> pd.DataFrame:
    """CS(k) for k = 0..k_max: columns ``k, observed, normal, laplace, normal_fit``."""
    e = _check_residuals(residuals)
    k_max = _check_k_max(k_max)
    ks = np.arange(k_max + 1, dtype=float)
    abs_sorted = np.sort(np.abs(e))
    models = _theory_models(e)
    frame = {"k": np.arange(k_max + 1), "observed": _share_within(abs_sorted, ks)}
    for name, model in models.items():
        frame[name] = model.cdf(ks)
    return pd.DataFrame(frame)


@_quiet
def coverage_summary(residuals: object) -> MetricSet:
    """Observed coverage vs coverage predicted from the MAE (see module docstring)."""
    e = _check_residuals(residuals)
    abs_sorted = np.sort(np.abs(e))
    mae = float(abs_sorted.mean())
    models = _theory_models(e)
    out = MetricSet()
    out.put("coverage_at_mae", _share_within(abs_sorted, mae))
    # The MAE-only predictions are constants by construction; logged for side-by-side plots.
    out.put("coverage_at_mae_normal", NORMAL_CS_AT_MAE)
    out.put("coverage_at_mae_laplace", LAPLACE_CS_AT_MAE)
    out.put("coverage_at_mae_normal_fit", models["normal_fit"].cdf(mae))
    for k in COVERAGE_KS:
        out.put(f"coverage_at_{k}", _share_within(abs_sorted, float(k)))
    for name, model in models.items():
        out.put(f"cs_gap_{name}", _sup_gap(abs_sorted, model))
    for p in YEARS_FOR:
        # smallest k with CS(k) >= p: the ceil(p*n)-th smallest |e| (inverted-CDF quantile)
        out.put(f"years_for_{p}", np.quantile(abs_sorted, p / 100.0, method="inverted_cdf"))
    for p in YEARS_FOR:
        out.put(f"years_for_{p}_normal", models["normal"].quantile(p / 100.0))
    for p in YEARS_FOR:
        out.put(f"years_for_{p}_laplace", models["laplace"].quantile(p / 100.0))
    return out


# ----------------------------------------------------------------------------- normality


@dataclass(frozen=True)
class NormalityResult:
    """Normality / shape scalars plus the verdict string and its explanation."""

    scalars: MetricSet
    verdict: str
    verdict_reason: str


def _ks_distance(x_sorted: np.ndarray, cdf_values: np.ndarray) -> float:
    """One-sample KS distance for a continuous CDF evaluated at the sorted sample."""
    n = x_sorted.size
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - cdf_values), np.max(cdf_values - (i - 1) / n)))


def _anderson_normal(x: np.ndarray) -> float:
    """Anderson-Darling A^2 against N(mean, sd ddof=1), as scipy.stats.anderson computes it."""
    n = x.size
    w = np.sort((x - x.mean()) / x.std(ddof=1))
    i = np.arange(1, n + 1)
    # ln Phi(w_i) + ln(1 - Phi(w_{n+1-i})), with log_ndtr for accuracy in the tails
    terms = (2 * i - 1) * (special.log_ndtr(w) + special.log_ndtr(-w[::-1]))
    return float(-n - terms.sum() / n)


def _tail(x: np.ndarray, centre: float, half_width: float) -> tuple[float, float]:
    """(share outside centre +- half_width divided by the nominal 1 %, one-sided binomial p)."""
    n = x.size
    outside = int(np.sum(np.abs(x - centre) > half_width))
    nominal = 1.0 - VERDICT_TAIL_LEVEL
    return outside / n / nominal, float(stats.binom.sf(outside - 1, n, nominal))


def _shape_words(skew: float, kurt: float) -> str:
    words = []
    if abs(skew) > 0.5:
        words.append(f"skewed ({skew:+.2f})")
    if kurt > 3.5:
        words.append("tails heavier than Laplace")
    elif kurt < -0.5:
        words.append("tails lighter than normal")
    desc = ", ".join(words) if words else "shape between the two models"
    return f"{desc}; skewness {skew:.2f}, excess kurtosis {kurt:.2f} (normal 0, Laplace 3)"


def _verdict(n: int, s: MetricSet, tail_p: dict[str, float]) -> tuple[str, str]:
    if any(math.isnan(s[k]) for k in ("loglik_normal", "loglik_laplace")):
        return "undetermined", "residuals are constant: no distribution shape to judge"
    if n < VERDICT_MIN_N:
        return "undetermined", f"too few residuals (n={n} < {VERDICT_MIN_N}) to tell shapes apart"
    pick = "laplace" if s["loglik_laplace"] > s["loglik_normal"] else "normal"
    d_aic = s["aic_normal_minus_laplace"]
    ks = s[f"ks_{pick}_fit"]
    ks_limit = max(VERDICT_KS_TOLERANCE, VERDICT_KS_C / math.sqrt(n))
    ratio = s[f"tail_ratio_{pick}"]
    tail_bad = ratio > VERDICT_TAIL_MAX_RATIO and tail_p[pick] < VERDICT_TAIL_P
    head = (
        f"AIC prefers {pick} (AIC normal - laplace = {d_aic:.1f}); {pick} fit: KS distance "
        f"{ks:.3f} (limit {ks_limit:.3f}), {ratio:.2f}x the expected 1% beyond its 99% interval"
    )
    if ks <= ks_limit and not tail_bad:
        return pick, f"{head} -> {pick}"
    failed = []
    if ks > ks_limit:
        failed.append("body misfit (KS)")
    if tail_bad:
        failed.append("too many large errors")
    shape = _shape_words(s["skewness"], s["excess_kurtosis"])
    return (
        "heavy-tailed",
        f"{head} -> heavy-tailed: neither model fits ({' and '.join(failed)}; {shape})",
    )


@_quiet
def normality(residuals: object, y_true: object = None, *, seed: int = 0) -> NormalityResult:
    """Shape diagnostics of the residuals, the normal-vs-Laplace verdict, heteroscedasticity.

    ``y_true`` (true ages, same length) enables the Breusch-Pagan test and ``hetero_slope``;
    ``seed`` fixes the Shapiro-Wilk subsample.
    """
    e = _check_residuals(residuals)
    n = e.size
    t = None
    if y_true is not None:
        t = _as_1d(y_true, "y_true")
        if t.size != n:
            raise ValueError(f"length mismatch: y_true has {t.size} values but residuals has {n}")
    out = MetricSet()
    constant = _is_constant(e)
    shape_names = [
        "skewness",
        "excess_kurtosis",
        "shapiro_stat",
        "shapiro_p",
        "dagostino_stat",
        "dagostino_p",
        "anderson_stat",
        "anderson_crit_5",
        "jarque_bera_stat",
        "jarque_bera_p",
        "lilliefors_stat",
        "lilliefors_p",
        "ks_normal_fit",
        "ks_laplace_fit",
        "tail_ratio_normal",
        "tail_ratio_laplace",
        "loglik_normal",
        "loglik_laplace",
        "aic_normal_minus_laplace",
    ]
    tail_p: dict[str, float] = {}
    if constant:
        out.nan(shape_names, "residuals are constant: distribution shape undefined")
    else:
        tail_p = _shape_stats(e, out, seed)
    verdict, reason = _verdict(n, out, tail_p)
    out.put("verdict_code", VERDICT_CODES[verdict], None if verdict != "undetermined" else reason)
    _heteroscedasticity(e, t, out)
    return NormalityResult(out, verdict, reason)


def _shape_stats(e: np.ndarray, out: MetricSet, seed: int) -> dict[str, float]:
    """Fill ``out`` with the shape statistics; return the tail-check binomial p-values."""
    n = e.size
    out.put("skewness", stats.skew(e, bias=True))
    out.put("excess_kurtosis", stats.kurtosis(e, fisher=True, bias=True))

    sub = e
    if n > SHAPIRO_MAX_N:
        idx = np.random.default_rng(seed).choice(n, SHAPIRO_MAX_N, replace=False)
        sub = e[idx]
        out.notes["shapiro_p"] = f"computed on a seeded random subsample of {SHAPIRO_MAX_N} of {n}"
    w, p = stats.shapiro(sub)
    out.put("shapiro_stat", w)
    out.put("shapiro_p", p)

    if n < DAGOSTINO_MIN_N:
        out.nan(["dagostino_stat", "dagostino_p"], f"D'Agostino K^2 needs n >= 8 (n={n})")
    else:
        k2, p = stats.normaltest(e)
        note = "approximate: kurtosis test is unreliable for n < 20" if n < 20 else None
        out.put("dagostino_stat", k2)
        out.put("dagostino_p", p, note)

    if n < ANDERSON_MIN_N:
        out.nan(["anderson_stat", "anderson_crit_5"], f"A-D critical values need n >= 8 (n={n})")
    else:
        out.put("anderson_stat", _anderson_normal(e))
        out.put("anderson_crit_5", ANDERSON_CRIT_5_ASYMPTOTIC / (1.0 + 4.0 / n - 25.0 / n**2))

    jb = stats.jarque_bera(e)
    out.put("jarque_bera_stat", jb.statistic)
    out.put("jarque_bera_p", jb.pvalue)

    if n < LILLIEFORS_MIN_N:
        out.nan(["lilliefors_stat", "lilliefors_p"], f"Lilliefors needs n >= 4 (n={n})")
    else:
        from statsmodels.stats.diagnostic import lilliefors

        d, p = lilliefors(e, dist="norm", pvalmethod="table")
        out.put("lilliefors_stat", d)
        out.put("lilliefors_p", p)

    # Maximum-likelihood fits. Normal: mean and sd (ddof=0); Laplace: median and mean absolute
    # deviation from the median. Closed-form maximised log-likelihoods:
    #   normal:  -n/2 * (log(2*pi*sd^2) + 1)      Laplace: -n * (log(2*b) + 1)
    mu, sd = float(e.mean()), float(e.std())
    med = float(np.median(e))
    b = float(np.mean(np.abs(e - med)))
    ll_n = -0.5 * n * (math.log(2.0 * math.pi * sd * sd) + 1.0)
    ll_l = -n * (math.log(2.0 * b) + 1.0)
    out.put("loglik_normal", ll_n)
    out.put("loglik_laplace", ll_l)
    out.put("aic_normal_minus_laplace", 2.0 * (ll_l - ll_n))

    x = np.sort(e)
    out.put("ks_normal_fit", _ks_distance(x, special.ndtr((x - mu) / sd)))
    out.put("ks_laplace_fit", _ks_distance(x, stats.laplace.cdf(x, med, b)))
    tail_level = (1.0 + VERDICT_TAIL_LEVEL) / 2.0
    tail_p = {}
    for name, centre, half in (
        ("normal", mu, sd * float(special.ndtri(tail_level))),
        ("laplace", med, -b * math.log(1.0 - VERDICT_TAIL_LEVEL)),
    ):
        ratio, p_tail = _tail(e, centre, half)
        out.put(f"tail_ratio_{name}", ratio)
        tail_p[name] = p_tail
    return tail_p


def _heteroscedasticity(e: np.ndarray, t: np.ndarray | None, out: MetricSet) -> None:
    names = ["bp_stat", "bp_p", "hetero_slope"]
    if t is None:
        out.nan(names, "no true ages given: heteroscedasticity not tested")
        return
    if _is_constant(t):
        out.nan(names, "true ages are constant: cannot regress error size on age")
        return
    tc = t - t.mean()
    a = np.abs(e)
    out.put("hetero_slope", float(np.sum(tc * (a - a.mean()))) / float(np.sum(tc * tc)))
    if _is_constant(e * e):
        out.nan(["bp_stat", "bp_p"], "squared residuals are constant: Breusch-Pagan undefined")
        return
    from statsmodels.stats.diagnostic import het_breuschpagan

    lm, lm_p, _, _ = het_breuschpagan(e, np.column_stack([np.ones_like(t), t]), robust=True)
    out.put("bp_stat", lm)
    out.put("bp_p", lm_p)


# ----------------------------------------------------------------------------- age bands


MAX_DEFAULT_BANDS = 30


def decade_edges(values: np.ndarray, width: float = 10.0) -> np.ndarray:
    """Edges ``floor(min/w)*w, ..., floor(max/w)*w + w`` covering all values.

    If that would make more than ``MAX_DEFAULT_BANDS`` bands (absurd predictions spanning
    centuries), the width is multiplied by 10 until it does not.
    """
    vmin, vmax = float(np.min(values)), float(np.max(values))
    while (math.floor(vmax / width) - math.floor(vmin / width)) + 1 > MAX_DEFAULT_BANDS:
        width *= 10.0
    lo = math.floor(vmin / width) * width
    hi = math.floor(vmax / width) * width + width
    return np.arange(lo, hi + width / 2, width)


def _band_labels(edges: np.ndarray) -> list[str]:
    """Labels for the len(edges)+1 bands: '<e0', '[e0,e1)', ..., '>=e_m'."""

    def f(v: float) -> str:
        return f"{v:g}"

    inner = [f"[{f(a)},{f(b)})" for a, b in itertools.pairwise(edges)]
    return [f"<{f(edges[0])}", *inner, f">={f(edges[-1])}"]


def _band_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """0 for values < edges[0], i for edges[i-1] <= v < edges[i], len(edges) beyond the last."""
    return np.searchsorted(edges, values, side="right")


@_quiet
def age_band_table(
    y_true: object, y_pred: object, edges: Sequence[float] | None = None, *, by: str = "true"
) -> pd.DataFrame:
    """Per age band: ``band, lo, hi, count, mae, bias`` (band by true age unless by='pred').

    Inner bands are always listed (count 0 -> NaN MAE/bias); the open bands below the first
    and above the last edge only when they hold cases.
    """
    t, p = _check_pair(y_true, y_pred, "y_true", "y_pred")
    if by not in ("true", "pred"):
        raise ValueError(f"by must be 'true' or 'pred', got {by!r}")
    key = t if by == "true" else p
    e_ = decade_edges(key) if edges is None else _check_edges(edges)
    idx = _band_index(key, e_)
    lows = np.concatenate([[-np.inf], e_])
    highs = np.concatenate([e_, [np.inf]])
    rows = []
    e = p - t
    for j, label in enumerate(_band_labels(e_)):
        m = idx == j
        count = int(m.sum())
        outer = j == 0 or j == len(e_)
        if outer and count == 0:
            continue
        rows.append(
            {
                "band": label,
                "lo": float(lows[j]),
                "hi": float(highs[j]),
                "count": count,
                "mae": float(np.mean(np.abs(e[m]))) if count else math.nan,
                "bias": float(np.mean(e[m])) if count else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=["band", "lo", "hi", "count", "mae", "bias"])


# ----------------------------------------------------------------------------- conformal


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """Split-conformal half-width: the ceil((n+1)*level)-th smallest score (inf if > n)."""
    s = np.sort(np.asarray(scores, dtype=float))
    n = s.size
    # subtract a hair so that e.g. (999 + 1) * 0.9 = 900.0000000000001 does not round up to 901
    rank = math.ceil((n + 1) * level - 1e-9)
    return math.inf if rank > n else float(s[max(rank, 1) - 1])


def _pool_bands(counts: Sequence[int], need: int) -> list[list[int]]:
    """Group band indices into contiguous pools holding >= ``need`` calibration points each.

    Bands with enough points stand alone. Consecutive sparse bands are pooled first -- at the
    extremes of the predicted-age range sit the cases with the largest errors, and giving them
    a typical (e.g. the global) quantile badly under-covers them -- then any pool still short
    merges with its smaller neighbour. A single remaining pool means the global quantile.
    """
    groups: list[list[int]] = []
    for j, c in enumerate(counts):
        if c < need and groups and counts[groups[-1][0]] < need:
            groups[-1].append(j)
        else:
            groups.append([j])

    def total(g: list[int]) -> int:
        return sum(counts[i] for i in g)

    while len(groups) > 1:
        short = [i for i, g in enumerate(groups) if total(g) < need]
        if not short:
            break
        i = short[0]
        neighbours = [k for k in (i - 1, i + 1) if 0 <= k < len(groups)]
        k = min(neighbours, key=lambda k: total(groups[k]))  # ties: the left neighbour
        lo, hi = sorted((i, k))
        groups[lo : hi + 1] = [groups[lo] + groups[hi]]
    return groups


@dataclass(frozen=True)
class ConformalInterval:
    """Split-conformal interval ``prediction +- q`` at one level, plus the band variant.

    ``band_q[j]`` is the half-width for band j of ``band_edges`` by *predicted* age (bands as
    in :func:`age_band_table`: index 0 is below the first edge, the last one above the last
    edge); ``band_n[j]`` its calibration count; ``band_fallback[j]`` is True when the band had
    too few calibration points for its own quantile and ``band_pool[j]`` names the bands whose
    points were used instead (``"all"`` = the global quantile).
    """

    level: float
    q: float
    n_calib: int
    band_edges: tuple[float, ...]
    band_q: tuple[float, ...]
    band_n: tuple[int, ...]
    band_fallback: tuple[bool, ...]
    band_pool: tuple[str, ...]

    @property
    def band_labels(self) -> list[str]:
        return _band_labels(np.asarray(self.band_edges))

    def half_width(self, y_pred: object, banded: bool = False) -> np.ndarray:
        """Interval half-width for each prediction (global q, or the q of its band)."""
        p = np.asarray(y_pred, dtype=float).reshape(-1)
        if not banded:
            return np.full(p.shape, self.q)
        return np.asarray(self.band_q)[_band_index(p, np.asarray(self.band_edges))]

    def interval(self, y_pred: object, banded: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper interval ends for new predictions."""
        p = np.asarray(y_pred, dtype=float).reshape(-1)
        h = self.half_width(p, banded)
        return p - h, p + h


def _fit_bands(
    scores: np.ndarray,
    calib_band: np.ndarray,
    edges: np.ndarray,
    level: float,
    q_global: float,
    min_band_calib: int,
    sparse_bands: str,
) -> tuple[list[float], list[bool], list[str]]:
    n_bands = len(edges) + 1
    counts = [int(np.sum(calib_band == j)) for j in range(n_bands)]
    # a band needs min_band_calib points, and enough for a finite quantile at this level
    need = max(min_band_calib, math.ceil(level / (1.0 - level) - 1e-9), 1)
    labels = _band_labels(edges)
    band_q, fallback, pool = [math.inf] * n_bands, [False] * n_bands, [""] * n_bands
    # "global": every band is its own group and sparse ones use the global quantile
    merge = sparse_bands == "merge"
    groups = _pool_bands(counts, need) if merge else [[j] for j in range(n_bands)]
    for g in groups:
        n_g = sum(counts[j] for j in g)
        if len(groups) == 1 or (sparse_bands == "global" and n_g < need):
            q_g, name = q_global, "all"
        else:
            q_g = conformal_quantile(scores[np.isin(calib_band, g)], level)
            name = labels[g[0]] if len(g) == 1 else f"{labels[g[0]]}..{labels[g[-1]]}"
        for j in g:
            band_q[j], pool[j] = q_g, name
            fallback[j] = counts[j] < need
    return band_q, fallback, pool


@_quiet
def conformal_intervals(
    y_true_calib: object,
    y_pred_calib: object,
    y_true_test: object,
    y_pred_test: object,
    *,
    levels: Sequence[float] = DEFAULT_CONFORMAL_LEVELS,
    band_edges: Sequence[float] | None = None,
    min_band_calib: int = 50,
    sparse_bands: str = "merge",
) -> tuple[MetricSet, dict[float, ConformalInterval]]:
    """Fit split-conformal intervals on the calib split, evaluate coverage/width on test.

    Bands are by predicted age (decades spanning the calibration predictions by default). A
    band with at least ``min_band_calib`` calibration points (and enough for a finite
    quantile) uses its own quantile. Sparse bands: ``sparse_bands="merge"`` (default) pools
    them with adjacent bands (see :func:`_pool_bands`); ``"global"`` gives them the global q.
    """
    tc, pc = _check_pair(y_true_calib, y_pred_calib, "y_true_calib", "y_pred_calib")
    tt, pt = _check_pair(y_true_test, y_pred_test, "y_true_test", "y_pred_test")
    levels = _check_levels(levels)
    if isinstance(min_band_calib, bool) or not isinstance(min_band_calib, (int, np.integer)):
        raise ValueError(f"min_band_calib must be an integer, got {min_band_calib!r}")
    if sparse_bands not in ("merge", "global"):
        raise ValueError(f"sparse_bands must be 'merge' or 'global', got {sparse_bands!r}")
    edges = decade_edges(pc) if band_edges is None else _check_edges(band_edges, "band_edges")
    scores = np.abs(pc - tc)
    test_abs = np.abs(pt - tt)
    calib_band = _band_index(pc, edges)
    band_n = tuple(int(np.sum(calib_band == j)) for j in range(len(edges) + 1))

    out = MetricSet()
    out.put("n_calib", tc.size)
    fitted: dict[float, ConformalInterval] = {}
    for level in levels:
        name = _pct(level)
        q = conformal_quantile(scores, level)
        band_q, fallback, pool = _fit_bands(
            scores, calib_band, edges, level, q, int(min_band_calib), sparse_bands
        )
        ci = ConformalInterval(
            level=level,
            q=q,
            n_calib=tc.size,
            band_edges=tuple(map(float, edges)),
            band_q=tuple(band_q),
            band_n=band_n,
            band_fallback=tuple(fallback),
            band_pool=tuple(pool),
        )
        fitted[level] = ci
        hw = ci.half_width(pt, banded=True)
        out.put(f"conformal_{name}_coverage", np.mean(test_abs <= q))
        out.put(f"conformal_{name}_width", 2.0 * q)
        out.put(f"conformal_band_{name}_coverage", np.mean(test_abs <= hw))
        out.put(f"conformal_band_{name}_width", np.mean(2.0 * hw))
        if not math.isfinite(q):
            note = (
                f"{tc.size} calibration points are too few for a finite {name}% interval "
                f"(need >= {math.ceil(level / (1 - level) - 1e-9)}): the interval is unbounded"
            )
            for key in ("width", "coverage"):
                out.notes[f"conformal_{name}_{key}"] = note
                out.notes[f"conformal_band_{name}_{key}"] = note
    return out, fitted


# ----------------------------------------------------------------------------- top level


@dataclass
class Diagnostics:
    """Everything :func:`evaluate` computes for one run.

    ``scalars`` are MLflow-ready ``{name: float}`` (see ``METRIC_DOCS``); ``verdict`` /
    ``verdict_reason`` are strings (log them as tags); ``notes`` explain NaNs and caveats.
    """

    scalars: dict[str, float]
    verdict: str
    verdict_reason: str
    cs_curve: pd.DataFrame
    bands: pd.DataFrame
    conformal: dict[float, ConformalInterval]
    notes: dict[str, str] = field(default_factory=dict)
    k_max: int = 15

    def summary(self) -> str:
        """A few human-readable lines (for logs / CLI)."""
        s = self.scalars
        lines = [
            f"n={s['n']:.0f}  MAE {s['mae']:.2f} y  RMSE {s['rmse']:.2f} y  "
            f"bias {s['bias']:+.2f} y",
            f"within MAE: {s['coverage_at_mae']:.1%} observed vs {s['coverage_at_mae_normal']:.1%}"
            f" normal / {s['coverage_at_mae_laplace']:.1%} Laplace theory",
            f"90% of errors within {s['years_for_90']:.2f} y;  shape verdict: {self.verdict}",
        ]
        for level, ci in self.conformal.items():
            p = _pct(level)
            cov, cov_band = s[f"conformal_{p}_coverage"], s[f"conformal_band_{p}_coverage"]
            lines.append(
                f"conformal {p}%: +-{ci.q:.2f} y, test coverage {cov:.1%} (banded {cov_band:.1%})"
            )
        return "\n".join(lines)


@_quiet
def evaluate(
    y_true_test: object,
    y_pred_test: object,
    y_true_calib: object = None,
    y_pred_calib: object = None,
    *,
    k_max: int = 15,
    age_bands: Sequence[float] | None = None,
    conformal_levels: Sequence[float] = DEFAULT_CONFORMAL_LEVELS,
    min_band_calib: int = 50,
    sparse_bands: str = "merge",
    seed: int = 0,
) -> Diagnostics:
    """All diagnostics for one run's test predictions (and calibration split, if given).

    ``k_max``: last k of the CS curve table. ``age_bands``: band edges in years for the
    per-band table (by true age) and the banded conformal intervals (by predicted age);
    default decades. ``conformal_levels``, ``min_band_calib``, ``sparse_bands``: see
    :func:`conformal_intervals`. ``seed``: the Shapiro-Wilk subsample. Raises ``ValueError``
    naming the argument for invalid input (see the module docstring).
    """
    if sparse_bands not in ("merge", "global"):
        raise ValueError(f"sparse_bands must be 'merge' or 'global', got {sparse_bands!r}")
    t, p = _check_pair(y_true_test, y_pred_test, "y_true_test", "y_pred_test")
    k_max = _check_k_max(k_max)
    levels = _check_levels(conformal_levels)
    edges = None if age_bands is None else _check_edges(age_bands)
    if (y_true_calib is None) != (y_pred_calib is None):
        given = "y_true_calib" if y_pred_calib is None else "y_pred_calib"
        missing = "y_pred_calib" if y_pred_calib is None else "y_true_calib"
        raise ValueError(f"{given} was given without {missing}: pass both or neither")
    e = p - t

    scalars = MetricSet()
    scalars.merge(point_metrics(t, p))
    scalars.merge(coverage_summary(e))
    norm = normality(e, t, seed=seed)
    scalars.merge(norm.scalars)

    conformal: dict[float, ConformalInterval] = {}
    if y_true_calib is None:
        scalars.nan("n_calib", "no calibration split given")
        scalars.nan(list(_conformal_docs(levels)), "no calibration split given")
    else:
        conf, conformal = conformal_intervals(
            y_true_calib,
            y_pred_calib,
            t,
            p,
            levels=levels,
            band_edges=edges,
            min_band_calib=min_band_calib,
            sparse_bands=sparse_bands,
        )
        scalars.merge(conf)

    values = {k: float(v) for k, v in scalars.items()}
    notes = dict(scalars.notes)
    for k, v in values.items():  # safety net: every NaN carries a reason
        if math.isnan(v) and k not in notes:
            notes[k] = "not computable for this input (numerical degeneracy)"
    return Diagnostics(
        scalars=values,
        verdict=norm.verdict,
        verdict_reason=norm.verdict_reason,
        cs_curve=cs_curve(e, k_max),
        bands=age_band_table(t, p, edges),
        conformal=conformal,
        notes=notes,
        k_max=k_max,
    )

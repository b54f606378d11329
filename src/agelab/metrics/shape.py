"""Residual shape: normality tests, maximum-likelihood fits, the verdict, heteroscedasticity.

:func:`normality` returns the scalars below plus a verdict string (see the package docstring
for the rule). The verdict's candidates are the fits in :data:`SHAPE_FITS`; each is a
function ``residuals → ShapeFit`` (log-likelihood, CDF, centre and the half-width of its
central 99 % interval) and gets the same checks: the lowest AIC is the candidate, then its
KS distance (body) and its share beyond the 99 % interval (tails) must pass. A new fit
(a generalized normal, say) is one such function, its entry in ``SHAPE_FITS`` and its
``loglik_``/``ks_``/``tail_ratio_`` names in ``_STAT_DOCS`` (which :data:`SHAPE_NAMES`
and :data:`SHAPE_DOCS` are made from).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from agelab.metrics.checks import MetricSet, as_1d, check_residuals, is_constant, quiet

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

VERDICT_CODES: dict[str, float] = {
    "normal": 0.0,
    "laplace": 1.0,
    "heavy-tailed": 2.0,
    "undetermined": math.nan,
}

_STAT_DOCS: dict[str, str] = {
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
}
SHAPE_DOCS: dict[str, str] = {
    **_STAT_DOCS,
    "verdict_code": "shape verdict: 0 normal, 1 laplace, 2 heavy-tailed (NaN: undetermined)",
    "bp_stat": "Breusch-Pagan LM (Koenker) of squared residual on true age",
    "bp_p": "Breusch-Pagan p-value (small = error size depends on age)",
    "hetero_slope": "OLS slope of |residual| on true age (years of error per year of age)",
}

#: The shape statistics (NaN with a note when the residuals are constant).
SHAPE_NAMES: tuple[str, ...] = tuple(_STAT_DOCS)


@dataclass(frozen=True)
class NormalityResult:
    """Normality / shape scalars plus the verdict string and its explanation."""

    scalars: MetricSet
    verdict: str
    verdict_reason: str


# ---------------------------------------------------------------------------------- fits


@dataclass(frozen=True)
class ShapeFit:
    """A maximum-likelihood fit of the residuals: one candidate of the verdict."""

    name: str  # the verdict it gives, and the suffix of its metric names
    n_params: int  # for the AIC
    loglik: float  # maximised log-likelihood
    cdf: Callable[[np.ndarray], np.ndarray]
    centre: float
    tail_half_width: float  # half-width of its central VERDICT_TAIL_LEVEL interval

    @property
    def aic(self) -> float:
        return 2.0 * self.n_params - 2.0 * self.loglik


# Closed-form maximised log-likelihoods:
#   normal:  -n/2 * (log(2*pi*sd^2) + 1)      Laplace: -n * (log(2*b) + 1)


def fit_normal(e: np.ndarray) -> ShapeFit:
    """Normal: mean and sd (ddof=0)."""
    n = e.size
    mu, sd = float(e.mean()), float(e.std())
    return ShapeFit(
        name="normal",
        n_params=2,
        loglik=-0.5 * n * (math.log(2.0 * math.pi * sd * sd) + 1.0),
        cdf=lambda x: special.ndtr((x - mu) / sd),
        centre=mu,
        tail_half_width=sd * float(special.ndtri((1.0 + VERDICT_TAIL_LEVEL) / 2.0)),
    )


def fit_laplace(e: np.ndarray) -> ShapeFit:
    """Laplace: median and mean absolute deviation from the median."""
    n = e.size
    med = float(np.median(e))
    b = float(np.mean(np.abs(e - med)))
    return ShapeFit(
        name="laplace",
        n_params=2,
        loglik=-n * (math.log(2.0 * b) + 1.0),
        cdf=lambda x: stats.laplace.cdf(x, med, b),
        centre=med,
        tail_half_width=-b * math.log(1.0 - VERDICT_TAIL_LEVEL),
    )


#: The verdict's candidates, in order of preference on equal AIC.
SHAPE_FITS: tuple[Callable[[np.ndarray], ShapeFit], ...] = (fit_normal, fit_laplace)


def _ks_distance(x_sorted: np.ndarray, cdf_values: np.ndarray) -> float:
    """One-sample KS distance for a continuous CDF evaluated at the sorted sample."""
    n = x_sorted.size
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - cdf_values), np.max(cdf_values - (i - 1) / n)))


def _tail(x: np.ndarray, centre: float, half_width: float) -> tuple[float, float]:
    """(share outside centre +- half_width divided by the nominal 1 %, one-sided binomial p)."""
    n = x.size
    outside = int(np.sum(np.abs(x - centre) > half_width))
    nominal = 1.0 - VERDICT_TAIL_LEVEL
    return outside / n / nominal, float(stats.binom.sf(outside - 1, n, nominal))


def _fit_stats(e: np.ndarray, out: MetricSet) -> tuple[list[ShapeFit], dict[str, float]]:
    """Fit every candidate; put log-likelihoods, the AIC difference, KS distances and tail
    ratios into ``out``. Returns the fits and their tail-check binomial p-values."""
    fits = [fit(e) for fit in SHAPE_FITS]
    for f in fits:
        out.put(f"loglik_{f.name}", f.loglik)
    # Both models have two parameters, so AIC_normal - AIC_laplace = 2*(ll_laplace - ll_normal).
    out.put("aic_normal_minus_laplace", 2.0 * (out["loglik_laplace"] - out["loglik_normal"]))
    x = np.sort(e)
    for f in fits:
        out.put(f"ks_{f.name}_fit", _ks_distance(x, f.cdf(x)))
    tail_p = {}
    for f in fits:
        ratio, p_tail = _tail(e, f.centre, f.tail_half_width)
        out.put(f"tail_ratio_{f.name}", ratio)
        tail_p[f.name] = p_tail
    return fits, tail_p


# ------------------------------------------------------------------------ normality tests


def _anderson_normal(x: np.ndarray) -> float:
    """Anderson-Darling A^2 against N(mean, sd ddof=1), as scipy.stats.anderson computes it."""
    n = x.size
    w = np.sort((x - x.mean()) / x.std(ddof=1))
    i = np.arange(1, n + 1)
    # ln Phi(w_i) + ln(1 - Phi(w_{n+1-i})), with log_ndtr for accuracy in the tails
    terms = (2 * i - 1) * (special.log_ndtr(w) + special.log_ndtr(-w[::-1]))
    return float(-n - terms.sum() / n)


def _shapiro(e: np.ndarray, out: MetricSet, seed: int) -> None:
    n = e.size
    sub = e
    if n > SHAPIRO_MAX_N:
        idx = np.random.default_rng(seed).choice(n, SHAPIRO_MAX_N, replace=False)
        sub = e[idx]
        out.notes["shapiro_p"] = f"computed on a seeded random subsample of {SHAPIRO_MAX_N} of {n}"
    w, p = stats.shapiro(sub)
    out.put("shapiro_stat", w)
    out.put("shapiro_p", p)


def _normality_tests(e: np.ndarray, out: MetricSet, seed: int) -> None:
    """Moments, Shapiro-Wilk, D'Agostino-Pearson, Anderson-Darling, Jarque-Bera, Lilliefors."""
    n = e.size
    out.put("skewness", stats.skew(e, bias=True))
    out.put("excess_kurtosis", stats.kurtosis(e, fisher=True, bias=True))
    _shapiro(e, out, seed)
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


# -------------------------------------------------------------------------------- verdict


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


def _verdict(
    n: int, s: MetricSet, fits: list[ShapeFit], tail_p: dict[str, float]
) -> tuple[str, str]:
    if not fits or any(math.isnan(f.loglik) for f in fits):
        return "undetermined", "residuals are constant: no distribution shape to judge"
    if n < VERDICT_MIN_N:
        return "undetermined", f"too few residuals (n={n} < {VERDICT_MIN_N}) to tell shapes apart"
    pick = min(fits, key=lambda f: f.aic).name  # ties: the earlier fit
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


# ---------------------------------------------------------------------------- top level


@quiet
def normality(residuals: object, y_true: object = None, *, seed: int = 0) -> NormalityResult:
    """Shape diagnostics of the residuals, the normal-vs-Laplace verdict, heteroscedasticity.

    ``y_true`` (true ages, same length) enables the Breusch-Pagan test and ``hetero_slope``;
    ``seed`` fixes the Shapiro-Wilk subsample.
    """
    e = check_residuals(residuals)
    n = e.size
    t = None
    if y_true is not None:
        t = as_1d(y_true, "y_true")
        if t.size != n:
            raise ValueError(f"length mismatch: y_true has {t.size} values but residuals has {n}")
    out = MetricSet()
    fits: list[ShapeFit] = []
    tail_p: dict[str, float] = {}
    if is_constant(e):
        out.nan(SHAPE_NAMES, "residuals are constant: distribution shape undefined")
    else:
        _normality_tests(e, out, seed)
        fits, tail_p = _fit_stats(e, out)
    verdict, reason = _verdict(n, out, fits, tail_p)
    out.put("verdict_code", VERDICT_CODES[verdict], None if verdict != "undetermined" else reason)
    _heteroscedasticity(e, t, out)
    return NormalityResult(out, verdict, reason)


def _heteroscedasticity(e: np.ndarray, t: np.ndarray | None, out: MetricSet) -> None:
    """Breusch-Pagan (Koenker) of e^2 on [1, true age], and the OLS slope of |e| on age."""
    names = ["bp_stat", "bp_p", "hetero_slope"]
    if t is None:
        out.nan(names, "no true ages given: heteroscedasticity not tested")
        return
    if is_constant(t):
        out.nan(names, "true ages are constant: cannot regress error size on age")
        return
    tc = t - t.mean()
    a = np.abs(e)
    out.put("hetero_slope", float(np.sum(tc * (a - a.mean()))) / float(np.sum(tc * tc)))
    if is_constant(e * e):
        out.nan(["bp_stat", "bp_p"], "squared residuals are constant: Breusch-Pagan undefined")
        return
    from statsmodels.stats.diagnostic import het_breuschpagan

    lm, lm_p, _, _ = het_breuschpagan(e, np.column_stack([np.ones_like(t), t]), robust=True)
    out.put("bp_stat", lm)
    out.put("bp_p", lm_p)

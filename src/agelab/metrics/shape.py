"""Residual shape: normality tests, maximum-likelihood fits, the label, heteroscedasticity.

:func:`normality` returns the scalars below plus a label (rules: :mod:`.verdict`). The
fits in :data:`SHAPE_FITS` (normal, Laplace, generalized normal) each give a ``ShapeFit``
(log-likelihood, CDF, centre and the half-width of its central 99 % interval), reported as
``loglik_``/``ks_..._fit``/``tail_ratio_`` scalars; a new fit is one function
``(residuals, gennorm fit) -> ShapeFit``, its entry in ``SHAPE_FITS`` and its three names in
``_STAT_DOCS``. Residuals on a lattice (integer predictions and labels) are dequantized first
(:func:`~agelab.metrics.gennorm.dequantize`), so no test or distance rejects a shape only
because ages are integers; ``shape_lattice_step`` says when that happened.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

from agelab.metrics.checks import MetricSet, as_1d, check_residuals, is_constant, quiet
from agelab.metrics.gennorm import GennormFit, dequantize, gn_cdf
from agelab.metrics.gennorm import fit_gennorm as gennorm_fit
from agelab.metrics.verdict import (
    UNDETERMINED,
    VERDICT_CODES,
    decide,
    laplace_tail,
    quantile_skewness,
    systematic,
)

SHAPIRO_MAX_N = 5000
DAGOSTINO_MIN_N = 8
ANDERSON_MIN_N = 8
LILLIEFORS_MIN_N = 4
VERDICT_TAIL_LEVEL = 0.99  # the central interval of the tail_ratio_<fit> scalars

_STAT_DOCS: dict[str, str] = {
    "skewness": "moment skewness of the residuals (0 for symmetric)",
    "excess_kurtosis": "moment excess kurtosis (normal 0, Laplace 3)",
    "shapiro_stat": "Shapiro-Wilk W (seeded subsample of at most 5000)",
    "shapiro_p": "Shapiro-Wilk p-value (small = not normal)",
    "dagostino_stat": "D'Agostino-Pearson K^2 (skewness + kurtosis test, n >= 8)",
    "dagostino_p": "D'Agostino-Pearson p-value",
    "anderson_stat": "Anderson-Darling A^2 against the fitted normal (scipy.stats.anderson)",
    "anderson_crit_5": "scipy's 5% critical value for anderson_stat (reject normality above)",
    "anderson_p": "Anderson-Darling p-value (statsmodels normal_ad, Stephens' formulas)",
    "jarque_bera_stat": "Jarque-Bera statistic",
    "jarque_bera_p": "Jarque-Bera p-value",
    "lilliefors_stat": "Lilliefors KS distance to the normal with estimated mean/sd",
    "lilliefors_p": "Lilliefors p-value (tabulated)",
    "ks_normal_fit": "KS distance between residuals and the ML normal fit",
    "ks_laplace_fit": "KS distance between residuals and the ML Laplace fit",
    "ks_gennorm_fit": "KS distance between residuals and the ML generalized normal fit",
    "tail_ratio_normal": "share outside the fitted normal's central 99% interval / 1%",
    "tail_ratio_laplace": "share outside the fitted Laplace's central 99% interval / 1%",
    "tail_ratio_gennorm": "share outside the fitted generalized normal's central 99% interval / 1%",
    "loglik_normal": "maximised log-likelihood of a normal (mean, sd MLE)",
    "loglik_laplace": "maximised log-likelihood of a Laplace (median, mean abs deviation)",
    "loglik_gennorm": "maximised log-likelihood of a generalized normal (location, scale, shape)",
    "aic_normal_minus_laplace": "AIC_normal - AIC_laplace; > 0 favours Laplace",
    "shape_beta": "generalized-normal shape beta (2 normal, 1 Laplace, < 1 heavier tails)",
    "shape_beta_low": "lower end of beta's 95% profile-likelihood interval",
    "shape_beta_high": "upper end of beta's 95% profile-likelihood interval",
    "shape_beta_low_99": "lower end of beta's 99% profile interval (the labels use it)",
    "shape_beta_high_99": "upper end of beta's 99% profile interval (the labels use it)",
    "shape_location": "generalized-normal location (years): the centre of the *_centred curves",
    "shape_scale": "generalized-normal scale alpha (years)",
    "quantile_skewness": "(Q90 + Q10 - 2*Q50) / (Q90 - Q10): 0 symmetric, > 0 longer right tail",
    "symmetry_p": "p-value of the symmetry test on quantile_skewness (small = asymmetric)",
    "tail_ratio_laplace_999": "share beyond the ML Laplace's central 99.9% interval / 0.1%",
    "tail_p_laplace_999": "one-sided binomial p of that many residuals beyond it",
}
SHAPE_DOCS: dict[str, str] = {
    **_STAT_DOCS,
    "shape_lattice_step": "lattice step of the residuals (1 for integer ages), 0 if continuous",
    "verdict_code": "shape label: 0 normal, 1 laplace, 2 heavier than laplace, 3 between "
    "normal and laplace, 4 lighter than normal, 5 skewed (right), 6 skewed (left), "
    "NaN undetermined",
    "bp_stat": "Breusch-Pagan LM (Koenker) of squared residual on true age",
    "bp_p": "Breusch-Pagan p-value (small = error size depends on age)",
    "error_age_corr": "Pearson correlation of residual and true age (< 0: regression to the "
    "mean, over-estimating the young and under-estimating the old)",
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
    """A maximum-likelihood fit of the residuals, reported next to the others."""

    name: str  # the suffix of its metric names
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


def fit_normal(e: np.ndarray, gn: GennormFit | None = None) -> ShapeFit:
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


def fit_laplace(e: np.ndarray, gn: GennormFit | None = None) -> ShapeFit:
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


def fit_gennorm(e: np.ndarray, gn: GennormFit | None = None) -> ShapeFit:
    """Generalized normal: location, scale and shape (:mod:`.gennorm`; NaN if not fitted)."""
    gn = gn if gn is not None else gennorm_fit(e, 0)
    beta, alpha, mu = gn.beta, gn.scale, gn.location
    # P(|X - mu| <= w) = P(1/beta, (w/alpha)^beta), so w = alpha * P^-1(1/beta, level)^(1/beta)
    half = alpha * special.gammaincinv(1.0 / beta, VERDICT_TAIL_LEVEL) ** (1.0 / beta)
    return ShapeFit(
        name="gennorm",
        n_params=3,
        loglik=gn.loglik,
        cdf=lambda x: gn_cdf(x, beta, alpha, mu),
        centre=mu,
        tail_half_width=float(half),
    )


#: The fits reported side by side (each gives loglik_/ks_..._fit/tail_ratio_ scalars).
SHAPE_FITS: tuple[Callable[[np.ndarray, GennormFit | None], ShapeFit], ...] = (
    fit_normal,
    fit_laplace,
    fit_gennorm,
)


def _ks_distance(x_sorted: np.ndarray, cdf_values: np.ndarray) -> float:
    """One-sample KS distance for a continuous CDF evaluated at the sorted sample."""
    n = x_sorted.size
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - cdf_values), np.max(cdf_values - (i - 1) / n)))


def _tail_ratio(x: np.ndarray, centre: float, half_width: float) -> float:
    """Share outside centre +- half_width divided by the nominal share."""
    outside = int(np.sum(np.abs(x - centre) > half_width))
    return outside / x.size / (1.0 - VERDICT_TAIL_LEVEL)


def _fit_stats(e: np.ndarray, gn: GennormFit, out: MetricSet) -> None:
    """Log-likelihoods, the AIC difference, KS distances and tail ratios of every fit."""
    fits = [fit(e, gn) for fit in SHAPE_FITS]
    x = np.sort(e)
    for f in fits:
        if math.isnan(f.loglik):
            names = [f"loglik_{f.name}", f"ks_{f.name}_fit", f"tail_ratio_{f.name}"]
            out.nan(names, gn.note or "fit failed")
            continue
        out.put(f"loglik_{f.name}", f.loglik)
        out.put(f"ks_{f.name}_fit", _ks_distance(x, f.cdf(x)))
        out.put(f"tail_ratio_{f.name}", _tail_ratio(e, f.centre, f.tail_half_width))
    # Both models have two parameters, so AIC_normal - AIC_laplace = 2*(ll_laplace - ll_normal).
    out.put("aic_normal_minus_laplace", 2.0 * (out["loglik_laplace"] - out["loglik_normal"]))


def _shape_stats(x: np.ndarray, gn: GennormFit, out: MetricSet) -> tuple[float, ...]:
    """beta and its intervals, quantile skewness, the Laplace 99.9 % tail check."""
    names = ("beta", "beta_low", "beta_high", "beta_low_99", "beta_high_99", "location")
    for name in names:
        out.put(f"shape_{name}", getattr(gn, name), gn.note)
    out.put("shape_scale", gn.scale, gn.note)
    skew, p_sym = (float(v[0]) for v in quantile_skewness(x))
    ratio, p_tail = (float(v[0]) for v in laplace_tail(x))
    out.put("quantile_skewness", skew)
    out.put("symmetry_p", p_sym)
    out.put("tail_ratio_laplace_999", ratio)
    out.put("tail_p_laplace_999", p_tail)
    return skew, p_sym, ratio, p_tail


# ------------------------------------------------------------------------ normality tests


def _anderson(x: np.ndarray, out: MetricSet) -> None:
    """A^2 and the 5 % critical value from scipy, the p-value from statsmodels."""
    from statsmodels.stats.diagnostic import normal_ad

    out.put("anderson_stat", stats.anderson(x, "norm", method="interpolate").statistic)
    # scipy's own table (Stephens 1974, case 3); the method-less call is the one that
    # returns it, its FutureWarning is silenced by @quiet
    table = stats.anderson(x, "norm")
    level = list(np.asarray(table.significance_level, dtype=float)).index(5.0)
    out.put("anderson_crit_5", table.critical_values[level])
    out.put("anderson_p", normal_ad(x)[1])


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
        names = ["anderson_stat", "anderson_crit_5", "anderson_p"]
        out.nan(names, f"A-D critical values need n >= 8 (n={n})")
    else:
        _anderson(e, out)
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


# ---------------------------------------------------------------------------- top level


@quiet
def normality(
    residuals: object,
    y_true: object = None,
    *,
    seed: int = 0,
    shape: GennormFit | None = None,
) -> NormalityResult:
    """Shape diagnostics of the residuals, the shape label, heteroscedasticity.

    ``y_true`` (true ages, same length) enables the Breusch-Pagan test and ``hetero_slope``;
    ``seed`` fixes the Shapiro-Wilk subsample and the dequantizing jitter; ``shape`` is the
    generalized-normal fit of these residuals if the caller has it (else it is fitted here).
    """
    e = check_residuals(residuals)
    n = e.size
    t = None
    if y_true is not None:
        t = as_1d(y_true, "y_true")
        if t.size != n:
            raise ValueError(f"length mismatch: y_true has {t.size} values but residuals has {n}")
    out = MetricSet()
    x, step = dequantize(e, seed)
    out.put("shape_lattice_step", step)
    if is_constant(e):
        out.nan(SHAPE_NAMES, "residuals are constant: distribution shape undefined")
        verdict, reason = UNDETERMINED, "residuals are constant: no distribution shape to judge"
    else:
        if step > 0:
            out.notes["shape_lattice_step"] = (
                f"residuals lie on a {step:g}-year lattice: shape statistics use them with "
                f"seeded uniform jitter of one step (seed {seed})"
            )
        gn = shape if shape is not None else gennorm_fit(e, seed)
        _normality_tests(x, out, seed)
        _fit_stats(x, gn, out)
        verdict, reason = decide(gn, *_shape_stats(x, gn, out), n)
    _heteroscedasticity(e, t, out)
    r = _age_correlation(e, t)
    out.put("error_age_corr", r, None if math.isfinite(r) else "no (varying) true ages given")
    if verdict != UNDETERMINED or math.isfinite(r):
        verdict, reason = systematic(verdict, reason, r, out.get("bp_p", math.nan))
    note = reason if verdict == UNDETERMINED else None
    out.put("verdict_code", VERDICT_CODES[verdict], note)
    return NormalityResult(out, verdict, reason)


def _age_correlation(e: np.ndarray, t: np.ndarray | None) -> float:
    """Pearson correlation of the errors with the true age (NaN without varying ages)."""
    if t is None or is_constant(t) or is_constant(e):
        return math.nan
    return float(np.corrcoef(e, t)[0, 1])


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

"""Residual diagnostics for age regression: point metrics, coverage, normality, conformal.

Everything here is a pure function of numpy arrays (numpy, scipy, statsmodels, pandas only;
never torch). Import from the package: ``from agelab import metrics as M; M.evaluate(...)``.
Its modules:

:mod:`.evaluate`   :func:`evaluate` (all of the below for one run), ``Diagnostics``,
                   ``METRIC_DOCS`` / :func:`metric_names` (every scalar, documented)
:mod:`.point`      MAE, RMSE, bias, R^2, …
:mod:`.coverage`   CS(k) observed and predicted from the MAE; ``NORMAL_CS_AT_MAE`` …
:mod:`.gennorm`    the generalized-normal fit (shape beta with profile intervals), dequantizing,
                   :func:`coverage_at_mae_for_beta`
:mod:`.shape`      normality tests, normal/Laplace/GN fits, heteroscedasticity
:mod:`.verdict`    the shape label: rules, symmetry test, tail check
:mod:`.bands`      age bands and the per-band error table
:mod:`.conformal`  split-conformal intervals, global and per predicted-age band
:mod:`.checks`     ``MetricSet``, input validation, quiet numerics

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

Coverage predicted from the MAE alone (centred on 0)
    * normal residuals ``e ~ N(0, s)``: E|e| = s*sqrt(2/pi), so s = MAE*sqrt(pi/2) and
      CS(k) = 2*Phi(k/s) - 1. At k = MAE this is 2*Phi(sqrt(2/pi)) - 1 = erf(1/sqrt(pi))
      = 0.5751 whatever the MAE (the half-normal distribution, Johnson, Kotz & Balakrishnan,
      *Continuous Univariate Distributions* vol. 1, ch. 13).
    * Laplace residuals ``e ~ Laplace(0, b)``: E|e| = b, so b = MAE and |e| is exponential
      with mean b: CS(k) = 1 - exp(-k/b); CS(MAE) = 1 - 1/e = 0.6321.
    * generalized normal ``e ~ GN(0, a, beta)`` with the run's fitted beta: |e/a|^beta is
      Gamma(1/beta), E|e| = a*Gamma(2/beta)/Gamma(1/beta), so a = MAE*Gamma(1/beta)/Gamma(2/beta)
      and CS(k) = P(1/beta, (k/a)^beta) (regularized incomplete gamma); CS(MAE) =
      P(1/beta, (Gamma(2/beta)/Gamma(1/beta))^beta), a function of beta alone
      (:func:`coverage_at_mae_for_beta`: 0.5751 at 2, 0.6321 at 1, 0.7022 at 0.5).
    * "normal fit": ``e ~ N(bias, sd)`` with the sample bias and standard deviation, so
      CS(k) = Phi((k - bias)/sd) - Phi((-k - bias)/sd).
    * ``*_centred``: the same three shapes centred on their fitted location (mean, median,
      GN location) with the scale from the mean |e - location|; CS(k) = F(k) - F(-k).
    The gap of a theory curve is the Kolmogorov-Smirnov distance sup_k |CS_obs(k) - CS(k)|
    over all k >= 0, computed exactly at the jumps of the observed step function.

Normality diagnostics
    Moment skewness and excess kurtosis; Shapiro-Wilk (on a seeded subsample of at most 5,000
    points, the range where its p-value is accurate); D'Agostino-Pearson K^2 (n >= 8);
    Anderson-Darling A^2 for the normal with estimated mean and sd, its 5 % critical value
    from ``scipy.stats.anderson`` and its p-value from statsmodels ``normal_ad``; Jarque-Bera;
    Lilliefors (KS with estimated parameters, statsmodels). Maximum-likelihood fits: normal
    (mean, sd with ddof=0), Laplace (median, mean absolute deviation from the median) and
    generalized normal (:mod:`.gennorm`), with log-likelihoods and the AIC difference normal -
    Laplace (both have two parameters, so it is 2*(ll_laplace - ll_normal)). Residuals on a
    lattice (integer ages) are dequantized with seeded uniform jitter of one step first.

Shape label (a string, rules in :mod:`.verdict`)
    ``undetermined`` (n < 20 or constant), ``skewed (right|left)`` (significant and large
    quantile skewness), ``heavier than laplace`` (too many misses beyond a Laplace's 99.9 %
    interval, or beta's 99 % interval below 1), else from beta's 99 % interval: ``lighter than
    normal`` (> 2), ``normal`` (holds 2, not 1), ``between normal and laplace`` (inside
    (1, 2)), ``laplace`` (holds 1, not 2), ``undetermined`` (holds both).

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

from agelab.metrics.bands import MAX_DEFAULT_BANDS, age_band_table, decade_edges
from agelab.metrics.checks import MAX_ABS_VALUE, TOL, MetricSet
from agelab.metrics.conformal import (
    DEFAULT_CONFORMAL_LEVELS,
    MIN_CONFORMAL,
    ConformalInterval,
    calibration_split,
    conformal_intervals,
    conformal_quantile,
)
from agelab.metrics.coverage import (
    COVERAGE_KS,
    LAPLACE_CS_AT_MAE,
    NORMAL_CS_AT_MAE,
    YEARS_FOR,
    coverage_summary,
    cs_curve,
)
from agelab.metrics.evaluate import METRIC_DOCS, Diagnostics, evaluate, metric_names
from agelab.metrics.gennorm import GennormFit, coverage_at_mae_for_beta, fit_gennorm
from agelab.metrics.point import point_metrics
from agelab.metrics.shape import (
    ANDERSON_MIN_N,
    DAGOSTINO_MIN_N,
    LILLIEFORS_MIN_N,
    SHAPIRO_MAX_N,
    VERDICT_TAIL_LEVEL,
    NormalityResult,
    normality,
)
from agelab.metrics.verdict import VERDICT_CODES, VERDICT_MIN_N, label_rows

__all__ = [
    "ANDERSON_MIN_N",
    "COVERAGE_KS",
    "DAGOSTINO_MIN_N",
    "DEFAULT_CONFORMAL_LEVELS",
    "LAPLACE_CS_AT_MAE",
    "LILLIEFORS_MIN_N",
    "MAX_ABS_VALUE",
    "MAX_DEFAULT_BANDS",
    "METRIC_DOCS",
    "MIN_CONFORMAL",
    "NORMAL_CS_AT_MAE",
    "SHAPIRO_MAX_N",
    "TOL",
    "VERDICT_CODES",
    "VERDICT_MIN_N",
    "VERDICT_TAIL_LEVEL",
    "YEARS_FOR",
    "ConformalInterval",
    "Diagnostics",
    "GennormFit",
    "MetricSet",
    "NormalityResult",
    "age_band_table",
    "calibration_split",
    "conformal_intervals",
    "conformal_quantile",
    "coverage_at_mae_for_beta",
    "coverage_summary",
    "cs_curve",
    "decade_edges",
    "evaluate",
    "fit_gennorm",
    "label_rows",
    "metric_names",
    "normality",
    "point_metrics",
]

"""Residual diagnostics for age regression: point metrics, coverage, normality, conformal.

Everything here is a pure function of numpy arrays (numpy, scipy, statsmodels, pandas only;
never torch). Import from the package: ``from agelab import metrics as M; M.evaluate(...)``.
Its modules:

:mod:`.evaluate`   :func:`evaluate` (all of the below for one run), ``Diagnostics``,
                   ``METRIC_DOCS`` / :func:`metric_names` (every scalar, documented)
:mod:`.point`      MAE, RMSE, bias, R^2, …
:mod:`.coverage`   CS(k) observed and predicted from the MAE; ``NORMAL_CS_AT_MAE`` …
:mod:`.shape`      normality tests, normal/Laplace fits, the verdict, heteroscedasticity
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

from agelab.metrics.bands import MAX_DEFAULT_BANDS, age_band_table, decade_edges
from agelab.metrics.checks import MAX_ABS_VALUE, TOL, MetricSet
from agelab.metrics.conformal import (
    DEFAULT_CONFORMAL_LEVELS,
    ConformalInterval,
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
from agelab.metrics.point import point_metrics
from agelab.metrics.shape import (
    ANDERSON_CRIT_5_ASYMPTOTIC,
    ANDERSON_MIN_N,
    DAGOSTINO_MIN_N,
    LILLIEFORS_MIN_N,
    SHAPIRO_MAX_N,
    VERDICT_CODES,
    VERDICT_KS_C,
    VERDICT_KS_TOLERANCE,
    VERDICT_MIN_N,
    VERDICT_TAIL_LEVEL,
    VERDICT_TAIL_MAX_RATIO,
    VERDICT_TAIL_P,
    NormalityResult,
    normality,
)

__all__ = [
    "ANDERSON_CRIT_5_ASYMPTOTIC",
    "ANDERSON_MIN_N",
    "COVERAGE_KS",
    "DAGOSTINO_MIN_N",
    "DEFAULT_CONFORMAL_LEVELS",
    "LAPLACE_CS_AT_MAE",
    "LILLIEFORS_MIN_N",
    "MAX_ABS_VALUE",
    "MAX_DEFAULT_BANDS",
    "METRIC_DOCS",
    "NORMAL_CS_AT_MAE",
    "SHAPIRO_MAX_N",
    "TOL",
    "VERDICT_CODES",
    "VERDICT_KS_C",
    "VERDICT_KS_TOLERANCE",
    "VERDICT_MIN_N",
    "VERDICT_TAIL_LEVEL",
    "VERDICT_TAIL_MAX_RATIO",
    "VERDICT_TAIL_P",
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

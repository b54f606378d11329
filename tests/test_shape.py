"""Residual shape as a number (issue 15): the generalized-normal fit and its interval, the
labels and their acceptance simulations, discreteness, bias-aware curves, Anderson-Darling
values from scipy/statsmodels.

The simulations are seeded and vectorized (``label_rows`` / ``fit_rows`` fit 200 samples of
5,000 in about a second); those at n = 5,000 are marked slow.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.diagnostic import anderson_statistic, lilliefors, normal_ad

from agelab import metrics as M
from agelab.metrics import coverage_at_mae_for_beta, coverage_summary, evaluate, normality
from agelab.metrics.coverage import AbsModel, theory_models
from agelab.metrics.gennorm import dequantize, fit_gennorm, fit_rows, lattice_step
from agelab.metrics.verdict import SYSTEMATIC, label_rows, quantile_skewness


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


NORMAL, LAPLACE, BETWEEN = "normal", "laplace", "between normal and laplace"
HEAVIER, LIGHTER = "heavier than laplace", "lighter than normal"
RIGHT, LEFT = "skewed (right)", "skewed (left)"
SKEWED = {RIGHT, LEFT}
ALL_LABELS = {NORMAL, LAPLACE, BETWEEN, HEAVIER, LIGHTER, RIGHT, LEFT}


def _gn(beta: float):
    return lambda rng, size: stats.gennorm.rvs(beta, scale=3.0, size=size, random_state=rng)


#: Planted truths: sampler, the label it must get at n = 5,000, and the labels that would
#: *contradict* it. The symmetric labels are ordered by beta (heavier < laplace < between <
#: normal < lighter); a neighbour of the truth is imprecision a small sample may show, a label
#: two steps away, a skew on a symmetric truth, or a symmetric label on a skewed one contradicts.
TRUTHS = {
    "normal": (lambda rng, s: rng.normal(0.0, 3.0, s), NORMAL, {LAPLACE, HEAVIER} | SKEWED),
    "laplace": (lambda rng, s: rng.laplace(0.0, 3.0, s), LAPLACE, {NORMAL, LIGHTER} | SKEWED),
    "gennorm_1.5": (_gn(1.5), BETWEEN, {HEAVIER, LIGHTER} | SKEWED),
    "t3": (lambda rng, s: 3.0 * rng.standard_t(3, s), HEAVIER, {BETWEEN, NORMAL, LIGHTER} | SKEWED),
    "gamma_centred": (lambda rng, s: rng.gamma(2.0, 2.0, s) - 4.0, RIGHT, ALL_LABELS - {RIGHT}),
    "rounded_normal": (
        lambda rng, s: np.round(rng.normal(0.0, 3.0, s)),
        NORMAL,
        {LAPLACE, HEAVIER} | SKEWED,
    ),
    "biased_laplace": (
        lambda rng, s: 3.0 + rng.laplace(0.0, 3.0, s),
        LAPLACE,
        {NORMAL, LIGHTER} | SKEWED,
    ),
}


def _labels(truth: str, n: int, draws: int = 200) -> Counter:
    sampler = TRUTHS[truth][0]
    rng = np.random.default_rng(sum(map(ord, truth)) + n)
    return Counter(label_rows(sampler(rng, (draws, n))))


# --------------------------------------------------------------------------- acceptance


@pytest.mark.slow
@pytest.mark.parametrize("truth", list(TRUTHS))
def test_each_truth_gets_its_label_at_n_5000(truth):
    """>= 95 % of 200 draws (measured: 197-200 for every truth)."""
    counts = _labels(truth, 5000)
    assert counts[TRUTHS[truth][1]] >= 190, counts


@pytest.mark.parametrize("truth", list(TRUTHS))
def test_no_label_contradicts_the_truth_at_n_500(truth):
    """<= 5 % of 200 draws (measured: at most 2 %)."""
    counts = _labels(truth, 500)
    wrong = sum(counts[label] for label in TRUTHS[truth][2])
    assert wrong <= 10, counts


def _coverage(beta: float, n: int, draws: int) -> tuple[float, float]:
    rng = np.random.default_rng(int(beta * 100) + n)
    fits = fit_rows(_gn(beta)(rng, (draws, n)))
    inside = (fits["beta_low"] <= beta) & (beta <= fits["beta_high"])
    inside_99 = (fits["beta_low_99"] <= beta) & (beta <= fits["beta_high_99"])
    return float(inside.mean()), float(inside_99.mean())


@pytest.mark.parametrize("beta", [0.7, 1.0, 1.5, 2.0, 3.0])
def test_beta_interval_covers_the_true_beta_at_n_500(beta):
    """The 95 % profile interval covers in >= 92 % (measured 94.5-97 % over 400 draws)."""
    cov95, cov99 = _coverage(beta, 500, 400)
    assert cov95 >= 0.92
    assert cov99 >= 0.97


@pytest.mark.parametrize("n", [30, 100])
@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_beta_interval_covers_at_small_n(n, beta):
    """The Bartlett-type factor 1 + 24/n keeps the interval honest where Wilks alone is not
    (without it: 83-87 % at n = 20, 89-91 % at n = 36)."""
    cov95, _ = _coverage(beta, n, 400)
    assert cov95 >= 0.92


def test_small_samples_are_undetermined_rather_than_guessed():
    """n = 40: beta's 99 % interval usually holds both 1 and 2, and then the label says so
    instead of picking one (a guess that called 22 % of normal samples Laplace at n = 20)."""
    rng = np.random.default_rng(40)
    for sample, contradicting in (
        (rng.normal(size=(400, 40)), {LAPLACE, HEAVIER} | SKEWED),
        (rng.laplace(size=(400, 40)), {NORMAL, LIGHTER} | SKEWED),
    ):
        counts = Counter(label_rows(sample))
        assert counts["undetermined"] >= 200, counts
        assert sum(counts[label] for label in contradicting) <= 20, counts
    res = normality(np.random.default_rng(1).normal(size=40))
    assert res.verdict == "undetermined"
    assert "too few residuals to tell normal from Laplace" in res.verdict_reason


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.7, 1.0, 1.5, 2.0, 3.0])
def test_beta_interval_covers_the_true_beta_at_n_5000(beta):
    cov95, cov99 = _coverage(beta, 5000, 200)
    assert cov95 >= 0.92
    assert cov99 >= 0.97


def test_label_rows_agrees_with_single_runs():
    rng = np.random.default_rng(5)
    rows = np.vstack([rng.normal(0, 2, 800), rng.laplace(0, 2, 800), rng.gamma(2, 2, 800)])
    assert label_rows(rows) == [normality(row).verdict for row in rows]


def test_symmetry_test_size_and_power():
    """At the 1 % level the quantile-skewness test rejects symmetric truths in about 1 % of
    samples (heavy tails included: moment skewness would not be usable for t(3)) and the
    centred gamma(2) in all of them."""
    rng = np.random.default_rng(8)
    for sample in (rng.normal(size=(1000, 500)), rng.standard_t(3, (1000, 500))):
        _, p = quantile_skewness(sample)
        assert np.mean(p < 0.01) <= 0.02
    s, p = quantile_skewness(rng.gamma(2.0, 2.0, (200, 500)))
    assert np.all(p < 0.01) and np.all(s > M.verdict.SKEW_MIN)


# ------------------------------------------------------------------------ beta and its fit


def test_coverage_at_mae_for_beta():
    assert coverage_at_mae_for_beta(2.0) == pytest.approx(M.NORMAL_CS_AT_MAE, abs=1e-12)
    assert coverage_at_mae_for_beta(1.0) == pytest.approx(M.LAPLACE_CS_AT_MAE, abs=1e-12)
    assert round(coverage_at_mae_for_beta(0.5), 4) == 0.7022
    grid = np.geomspace(0.3, 10, 50)
    assert np.all(np.diff(coverage_at_mae_for_beta(grid)) < 0)  # monotone: heavier, more
    rng = np.random.default_rng(0)
    for beta in (0.5, 1.5, 4.0):  # against simulated GN errors
        e = stats.gennorm.rvs(beta, scale=2.0, size=400_000, random_state=rng)
        share = np.mean(np.abs(e) <= np.mean(np.abs(e)))
        assert share == pytest.approx(coverage_at_mae_for_beta(beta), abs=0.003)


@pytest.mark.parametrize("beta", [0.6, 1.0, 1.5, 2.0, 4.0])
def test_fit_matches_scipy_maximum_likelihood(beta):
    x = 5.0 + stats.gennorm.rvs(beta, scale=3.0, size=3000, random_state=int(beta * 10))
    fit = fit_gennorm(x)
    ref = stats.gennorm.fit(x)
    ll_ref = stats.gennorm.logpdf(x, *ref).sum()
    assert fit.loglik == pytest.approx(
        stats.gennorm.logpdf(x, fit.beta, fit.location, fit.scale).sum()
    )
    # the location is solved at the grid's best beta, not at beta-hat (a 0.015 loss at
    # beta = 1.5); for beta < 1 the ML location sits at a data point and the median stands in
    assert fit.loglik >= ll_ref - (0.5 if beta < 1 else 0.05)
    assert fit.beta == pytest.approx(ref[0], rel=0.01)
    assert fit.beta_low < fit.beta < fit.beta_high
    assert fit.beta_low_99 < fit.beta_low and fit.beta_high < fit.beta_high_99


def test_profile_interval_matches_brute_force():
    x = stats.gennorm.rvs(1.5, scale=3.0, size=1000, random_state=3)
    fit = fit_rows(x)
    mu = fit["location"][0]

    def profile(b: float) -> float:
        alpha = (b * np.mean(np.abs(x - mu) ** b)) ** (1 / b)
        return stats.gennorm.logpdf(x, b, mu, alpha).sum()

    betas = np.linspace(1.0, 2.2, 6001)
    ll = np.array([profile(b) for b in betas])
    drop = stats.chi2.ppf(0.95, 1) / 2 * (1 + M.gennorm.BARTLETT_C / x.size)
    inside = betas[ll >= ll.max() - drop]
    assert fit["beta"][0] == pytest.approx(betas[ll.argmax()], abs=5e-4)
    assert fit["beta_low"][0] == pytest.approx(inside.min(), abs=5e-4)
    assert fit["beta_high"][0] == pytest.approx(inside.max(), abs=5e-4)
    assert fit["loglik_beta_2"][0] == pytest.approx(profile(2.0))


def test_uniform_errors_reach_the_searched_edge():
    res = normality(np.random.default_rng(0).uniform(-5, 5, 2000))
    assert res.verdict == LIGHTER
    assert res.scalars["shape_beta_high"] == pytest.approx(M.gennorm.BETA_MAX)
    assert "reaches the end of the searched range" in res.scalars.notes["shape_beta"]


def test_too_few_or_constant_residuals_have_no_shape():
    small = evaluate(np.arange(12.0), np.arange(12.0) + np.random.default_rng(0).normal(0, 2, 12))
    for name in ("shape_beta", "shape_beta_low", "coverage_at_mae_gennorm", "cs_gap_gennorm"):
        assert math.isnan(small.scalars[name])
        assert "too few residuals" in small.notes[name]
    assert small.verdict == "undetermined"
    constant = normality(np.full(40, 2.5))
    assert math.isnan(constant.scalars["shape_beta"]) and constant.verdict == "undetermined"


def test_labels_codes_and_reasons():
    assert set(M.VERDICT_CODES) == ALL_LABELS | {"undetermined", SYSTEMATIC}
    codes = [c for c in M.VERDICT_CODES.values() if not math.isnan(c)]
    assert len(set(codes)) == len(codes) == 8
    assert (M.VERDICT_CODES[NORMAL], M.VERDICT_CODES[LAPLACE], M.VERDICT_CODES[HEAVIER]) == (
        0.0,
        1.0,
        2.0,
    )  # the codes runs logged before #15 keep their meaning
    res = normality(stats.gennorm.rvs(1.5, scale=3, size=5000, random_state=1))
    assert res.verdict == BETWEEN
    reason = res.verdict_reason
    assert reason.startswith(f"beta = {res.scalars['shape_beta']:.2f} (95 % interval ")
    assert reason.endswith("-> between normal and laplace: beta's 99 % interval lies between 1 "
                           "(Laplace) and 2 (normal)")  # fmt: skip


def test_new_metric_names_are_documented():
    names = [
        "shape_beta",
        "shape_beta_low",
        "shape_beta_high",
        "shape_beta_low_99",
        "shape_beta_high_99",
        "shape_location",
        "shape_scale",
        "shape_lattice_step",
        "quantile_skewness",
        "symmetry_p",
        "tail_ratio_laplace_999",
        "tail_p_laplace_999",
        "anderson_p",
        "loglik_gennorm",
        "ks_gennorm_fit",
        "tail_ratio_gennorm",
        "coverage_at_mae_gennorm",
        "coverage_at_mae_normal_centred",
        "coverage_at_mae_laplace_centred",
        "coverage_at_mae_gennorm_centred",
        "cs_gap_gennorm",
        "cs_gap_gennorm_centred",
        "years_for_90_gennorm",
        "years_for_90_laplace_centred",
    ]
    assert set(names) <= set(M.METRIC_DOCS)


# ---------------------------------------------------------------------------- discreteness


def test_lattice_detection():
    rng = np.random.default_rng(0)
    assert lattice_step(np.round(rng.normal(0, 3, 500))) == 1.0
    assert lattice_step(np.round(rng.normal(0, 3, 500) * 2) / 2) == 0.5
    assert lattice_step(np.array([0.0, 1.0, 2.5] * 10)) == 0.5  # no two values 0.5 apart
    assert lattice_step(np.array([31.1 - 30.1, 2.0, 0.0, 1.0, 2.0, 0.0])) == 1.0
    assert lattice_step(rng.normal(0, 3, 500)) == 0.0  # continuous
    assert lattice_step(np.round(rng.normal(0, 30, 40))) == 0.0  # few ties: left alone


def test_dequantize_is_seeded_and_stays_within_a_step():
    e = np.round(np.random.default_rng(1).normal(0, 3, 1000))
    a, step = dequantize(e, seed=4)
    assert step == 1.0
    assert np.array_equal(a, dequantize(e, seed=4)[0])
    assert not np.array_equal(a, dequantize(e, seed=5)[0])
    assert np.all(np.abs(a - e) <= 0.5) and np.unique(a).size == e.size
    x = np.random.default_rng(1).normal(0, 3, 1000)
    assert dequantize(x)[0] is x


def test_integer_ages_are_not_rejected_for_being_integers():
    """Integer labels and rounded predictions: the raw residuals fail every continuous test
    (Lilliefors p < 1e-3 here), the dequantized ones pass as often as normal data should."""
    low_p = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        t = rng.integers(1, 90, 2000).astype(float)
        p = np.round(t + rng.normal(0, 3, t.size))
        d = evaluate(t, p, seed=seed)
        s = d.scalars
        assert s["shape_lattice_step"] == 1.0 and "lattice" in d.notes["shape_lattice_step"]
        assert d.verdict == NORMAL, d.verdict_reason
        assert s["ks_normal_fit"] < 0.03 and s["cs_gap_normal"] < 0.03
        low_p += min(s["lilliefors_p"], s["anderson_p"], s["shapiro_p"]) < 0.01
        assert lilliefors(p - t, pvalmethod="table")[1] < 1e-3  # the raw residuals
    assert low_p <= 2


# -------------------------------------------------------------------------- centred curves


def test_centred_curves_follow_a_biased_run():
    """3 + Laplace(0, 3): the curves centred on 0 are more than a year off at 90 %, the
    centred ones are within a few tenths (issue 15: 8.23 observed vs 9.42 predicted)."""
    e = 3.0 + np.random.default_rng(2).laplace(0, 3, 20_000)
    s = coverage_summary(e)
    assert s["years_for_90_laplace"] - s["years_for_90"] > 1.0
    assert s["years_for_90_laplace_centred"] == pytest.approx(s["years_for_90"], abs=0.3)
    assert s["years_for_90_gennorm_centred"] == pytest.approx(s["years_for_90"], abs=0.3)
    assert s["cs_gap_laplace_centred"] < 0.015 and s["cs_gap_laplace"] > 0.02
    assert s["coverage_at_mae_gennorm_centred"] == pytest.approx(s["coverage_at_mae"], abs=0.01)
    assert s["coverage_at_mae_gennorm"] - s["coverage_at_mae"] > 0.015
    unbiased = coverage_summary(e - 3.0)
    for model in ("normal", "laplace", "gennorm"):
        for p in (50, 90):
            a, b = unbiased[f"years_for_{p}_{model}"], unbiased[f"years_for_{p}_{model}_centred"]
            assert a == pytest.approx(b, rel=0.03)


def test_gennorm_curve_fits_gennorm_errors():
    e = stats.gennorm.rvs(1.5, scale=3, size=20_000, random_state=4)
    s = coverage_summary(e)
    assert s["cs_gap_gennorm"] < 0.01 < 0.015 < s["cs_gap_laplace"]
    assert s["coverage_at_mae_gennorm"] == pytest.approx(s["coverage_at_mae"], abs=0.01)
    assert s["years_for_90_gennorm"] == pytest.approx(s["years_for_90"], rel=0.03)


@pytest.mark.parametrize(
    "model",
    [
        AbsModel("normal", 2.0, 1.5),
        AbsModel("laplace", 2.0, -3.0),
        AbsModel("gennorm", 2.0, 2.5, 1.3),
        AbsModel("gennorm", 2.0, 0.0, 0.7),
    ],
)
def test_model_quantile_inverts_its_cdf(model):
    for p in (0.5, 0.8, 0.9, 0.95):
        assert float(model.cdf(model.quantile(p))) == pytest.approx(p, abs=1e-8)


def test_theory_models_centre_on_each_fitted_location():
    e = np.random.default_rng(3).laplace(2.0, 1.0, 500)
    models = theory_models(e)
    assert models["normal_centred"].mu == pytest.approx(e.mean())
    assert models["laplace_centred"].mu == pytest.approx(np.median(e))
    assert models["gennorm_centred"].mu == pytest.approx(fit_gennorm(e).location)
    assert models["laplace_centred"].scale == pytest.approx(np.mean(np.abs(e - np.median(e))))


# ------------------------------------------------------------------------ Anderson-Darling


@pytest.mark.parametrize("n", [8, 20, 100, 1000, 5000])
def test_anderson_values_come_from_scipy_and_statsmodels(n):
    x = np.random.default_rng(n).normal(10, 3, n)
    s = normality(x).scalars
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the call that returns the table
        table = stats.anderson(x, "norm")
    assert s["anderson_stat"] == pytest.approx(table.statistic, rel=1e-12)
    assert s["anderson_crit_5"] == table.critical_values[list(table.significance_level).index(5)]
    assert s["anderson_p"] == pytest.approx(normal_ad(x)[1], rel=1e-12)


@pytest.mark.parametrize(("n", "draws"), [(20, 20_000), (1000, 4000)])
def test_anderson_critical_value_has_its_size(n, draws):
    """Rejections of normal samples at the 5 % critical value: 4.9 % at n = 20 and 4.8 % at
    n = 1,000 (the hand-typed constants it replaces: 5.9 % and 4.0 %)."""
    x = np.random.default_rng(n).normal(size=(draws, n))
    crit = normality(x[0]).scalars["anderson_crit_5"]
    size = np.mean(anderson_statistic(x, dist="norm", fit=True, axis=1) > crit)
    assert abs(size - 0.05) < 3.5 * math.sqrt(0.05 * 0.95 / draws)


def test_errors_that_follow_the_true_age_are_called_systematic_not_light():
    """Regression to the mean (a model pulling ages toward the middle) leaves errors spread
    evenly over a range: bounded tails the shape alone calls "lighter than normal". With the
    true ages the label says what it is; a weaker drift, and an error size growing with age,
    are said next to the shape label."""
    rng = np.random.default_rng(3)
    age = rng.uniform(1, 90, 2000)
    pulled = normality(-0.3 * (age - 45) + rng.normal(0, 4, 2000), age)
    assert pulled.verdict == SYSTEMATIC
    assert "errors correlate with the true age (r = -" in pulled.verdict_reason
    assert "the pooled errors alone would read 'lighter than normal'" in pulled.verdict_reason
    assert pulled.scalars["error_age_corr"] < -0.5
    fair = normality(rng.normal(0, 3, 2000), age)
    assert fair.verdict == NORMAL and abs(fair.scalars["error_age_corr"]) < 0.1
    growing = normality(rng.normal(0, 1 + 0.08 * age), age)
    assert growing.verdict in (LAPLACE, BETWEEN)
    assert "the error size changes with age (Breusch-Pagan p = " in growing.verdict_reason
    assert math.isnan(normality(rng.normal(0, 3, 500)).scalars["error_age_corr"])

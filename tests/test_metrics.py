"""Tests for agelab.metrics: theory constants, acceptance numbers, input checks, properties."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from agelab import metrics as M
from agelab.metrics import (
    LAPLACE_CS_AT_MAE,
    METRIC_DOCS,
    NORMAL_CS_AT_MAE,
    age_band_table,
    conformal_intervals,
    conformal_quantile,
    coverage_summary,
    cs_curve,
    evaluate,
    metric_names,
    normality,
    point_metrics,
)
from agelab.metrics.conformal import _pool_bands

MLFLOW_KEY = re.compile(r"^[A-Za-z0-9_\-./ ]+$")


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    """The module promises not to emit scipy/numpy warnings: make any warning fail the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _ages(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(1.0, 90.0, n)


# ----------------------------------------------------------------------------- theory


def test_theory_constants_exact():
    normal_theory = 2 * stats.norm.cdf(math.sqrt(2 / math.pi)) - 1
    assert abs(NORMAL_CS_AT_MAE - normal_theory) < 1e-15
    assert abs(LAPLACE_CS_AT_MAE - (1 - math.exp(-1))) < 1e-15
    assert round(NORMAL_CS_AT_MAE, 4) == 0.5751
    assert round(LAPLACE_CS_AT_MAE, 4) == 0.6321


def test_cs_curve_theory_columns_at_mae():
    e = np.array([-3.0, -1.0, 2.0, 2.0, 1.0, 3.0])  # MAE exactly 2
    curve = cs_curve(e, k_max=4)
    assert list(curve.columns) == [
        "k",
        "observed",
        "normal",
        "laplace",
        "normal_fit",
        "gennorm",
        "normal_centred",
        "laplace_centred",
        "gennorm_centred",
    ]
    assert curve["k"].tolist() == [0, 1, 2, 3, 4]
    at2 = curve.set_index("k").loc[2]
    assert at2["normal"] == pytest.approx(NORMAL_CS_AT_MAE, abs=1e-14)
    assert at2["laplace"] == pytest.approx(LAPLACE_CS_AT_MAE, abs=1e-14)
    assert at2["observed"] == pytest.approx(4 / 6)
    sd, bias = e.std(ddof=1), e.mean()
    expected_fit = stats.norm.cdf((2 - bias) / sd) - stats.norm.cdf((-2 - bias) / sd)
    assert at2["normal_fit"] == pytest.approx(expected_fit, abs=1e-12)
    # centred: each model on its own location, scale from the mean |e - location|
    s = np.mean(np.abs(e - bias)) * math.sqrt(math.pi / 2)
    expected = stats.norm.cdf(2, bias, s) - stats.norm.cdf(-2, bias, s)
    assert at2["normal_centred"] == pytest.approx(expected, abs=1e-12)
    med = np.median(e)
    b = np.mean(np.abs(e - med))
    expected = stats.laplace.cdf(2, med, b) - stats.laplace.cdf(-2, med, b)
    assert at2["laplace_centred"] == pytest.approx(expected, abs=1e-12)
    assert curve[["gennorm", "gennorm_centred"]].isna().all().all()  # n < 20: no shape fit
    assert curve.loc[0, "observed"] == 0.0


def test_cs_gap_is_exact_sup():
    e = np.array([0.5, -1.0, 1.0, 2.5, -4.0, 0.0, 7.0])
    s = coverage_summary(e)
    a = np.sort(np.abs(e))
    mae = a.mean()
    grid = np.linspace(0, 20, 400_001)
    # brute force, approaching the jumps from both sides
    obs_right = np.searchsorted(a, grid, side="right") / a.size
    obs_left = np.searchsorted(a, grid, side="left") / a.size
    laplace = 1 - np.exp(-grid / mae)
    brute = max(np.max(np.abs(obs_right - laplace)), np.max(np.abs(obs_left - laplace)))
    assert s["cs_gap_laplace"] >= brute - 1e-12
    assert s["cs_gap_laplace"] == pytest.approx(brute, abs=1e-4)


def test_years_for_definition_and_predictions():
    e = np.array([1.0, -2, 3, -4, 5, -6, 7, -8, 9, -10])
    s = coverage_summary(e)
    assert (s["years_for_50"], s["years_for_80"], s["years_for_90"], s["years_for_95"]) == (
        5.0,
        8.0,
        9.0,
        10.0,
    )
    mae = 5.5
    assert s["years_for_90_normal"] == pytest.approx(
        mae * math.sqrt(math.pi / 2) * stats.norm.ppf(0.95)
    )
    assert s["years_for_90_laplace"] == pytest.approx(mae * math.log(10))
    assert s["coverage_at_3"] == 0.3
    assert s["coverage_at_mae"] == 0.5


def test_coverage_tolerates_float_noise():
    t = np.array([30.1, 40.2, 50.3, 20.7])
    p = t + 1.0  # 31.1 - 30.1 is not exactly 1.0 in floating point
    s = evaluate(t, p).scalars
    assert s["coverage_at_1"] == 1.0
    assert s["coverage_at_mae"] == 1.0


# ----------------------------------------------------------------------------- acceptance


@pytest.mark.parametrize(
    ("kind", "target", "gap_name"),
    [
        ("normal", NORMAL_CS_AT_MAE, "cs_gap_normal"),
        ("laplace", LAPLACE_CS_AT_MAE, "cs_gap_laplace"),
    ],
)
def test_large_sample_coverage_matches_theory(kind, target, gap_name):
    rng = np.random.default_rng(42)
    e = rng.normal(0, 5, 200_000) if kind == "normal" else rng.laplace(0, 4, 200_000)
    s = coverage_summary(e)
    assert abs(s["coverage_at_mae"] - target) < 0.005
    assert s[gap_name] < 0.01
    other = "cs_gap_laplace" if kind == "normal" else "cs_gap_normal"
    assert s[other] > 0.05  # and the wrong theory is visibly off


@pytest.mark.parametrize("seed", range(5))
def test_verdict_normal_and_laplace(seed):
    rng = np.random.default_rng(seed)
    t = _ages(rng, 2000)
    normal = evaluate(t, t + 0.7 + rng.normal(0, 4.0, t.size), seed=seed)
    laplace = evaluate(t, t - 0.3 + rng.laplace(0, 3.0, t.size), seed=seed)
    assert normal.verdict == "normal", normal.verdict_reason
    assert normal.scalars["verdict_code"] == 0.0
    assert laplace.verdict == "laplace", laplace.verdict_reason
    assert laplace.scalars["verdict_code"] == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_labels_heavy_and_skewed(seed):
    rng = np.random.default_rng(100 + seed)
    n = 2000
    cauchy = rng.standard_cauchy(n)
    contaminated = np.where(rng.random(n) < 0.1, rng.normal(0, 5, n), rng.normal(0, 1, n))
    skewed = rng.gamma(2.0, 2.0, n)
    for e, label in (
        (cauchy, "heavier than laplace"),
        (contaminated, "heavier than laplace"),
        (skewed, "skewed (right)"),
        (-skewed, "skewed (left)"),
    ):
        res = normality(e)
        assert res.verdict == label, res.verdict_reason
        assert res.scalars["verdict_code"] == M.VERDICT_CODES[label]
        assert f"-> {label}: " in res.verdict_reason


def test_verdict_undetermined_for_tiny_samples():
    res = normality(np.array([1.0, -2.0, 0.5, 3.0, -1.0]))
    assert res.verdict == "undetermined"
    assert math.isnan(res.scalars["verdict_code"])
    assert "verdict_code" in res.scalars.notes


def test_normality_tests_reject_laplace():
    rng = np.random.default_rng(3)
    s = normality(rng.laplace(0, 3, 2000)).scalars
    for name in ("shapiro_p", "dagostino_p", "jarque_bera_p", "lilliefors_p"):
        assert s[name] < 0.01, name
    assert s["anderson_stat"] > s["anderson_crit_5"]
    assert s["aic_normal_minus_laplace"] > 0


def test_normality_tests_calibrated_on_normal_samples():
    names = ("shapiro_p", "dagostino_p", "jarque_bera_p", "lilliefors_p")
    rejections = dict.fromkeys(names, 0)
    for seed in range(200):
        s = normality(np.random.default_rng(seed).normal(10, 3, 2000), seed=seed).scalars
        for name in names:
            rejections[name] += s[name] < 0.05
    for name, count in rejections.items():
        assert 0.02 <= count / 200 <= 0.09, (name, count)


def test_anderson_statistic_matches_scipy():
    x = np.random.default_rng(0).normal(size=300)
    s = normality(x).scalars
    ref = stats.anderson(x, "norm", method="interpolate")
    assert s["anderson_stat"] == pytest.approx(ref.statistic, rel=1e-9)
    # scipy's table, case 3 (Stephens): 0.752 / (1 + 0.75/n + 2.25/n^2), rounded to 3 places
    assert s["anderson_crit_5"] == round(0.752 / (1 + 0.75 / 300 + 2.25 / 300**2), 3)


def test_moments_and_likelihoods():
    x = np.random.default_rng(1).normal(2, 3, 500)
    s = normality(x).scalars
    assert s["skewness"] == pytest.approx(stats.skew(x))
    assert s["excess_kurtosis"] == pytest.approx(stats.kurtosis(x))
    assert s["loglik_normal"] == pytest.approx(stats.norm.logpdf(x, x.mean(), x.std()).sum())
    med = np.median(x)
    b = np.mean(np.abs(x - med))
    assert s["loglik_laplace"] == pytest.approx(stats.laplace.logpdf(x, med, b).sum())
    assert s["aic_normal_minus_laplace"] == pytest.approx(
        2 * (s["loglik_laplace"] - s["loglik_normal"])
    )


def test_shapiro_subsample_is_seeded():
    x = np.random.default_rng(2).normal(size=12_000)
    a, b, c = normality(x, seed=1), normality(x, seed=1), normality(x, seed=2)
    assert a.scalars["shapiro_stat"] == b.scalars["shapiro_stat"]
    assert a.scalars["shapiro_stat"] != c.scalars["shapiro_stat"]
    assert "subsample of 5000" in a.scalars.notes["shapiro_p"]


def test_heteroscedasticity():
    rng = np.random.default_rng(5)
    t = _ages(rng, 3000)
    hetero = normality(rng.normal(0, 1 + t / 15), t).scalars
    homo = normality(rng.normal(0, 3, t.size), t).scalars
    assert hetero["bp_p"] < 1e-6
    assert hetero["hetero_slope"] == pytest.approx(np.sqrt(2 / np.pi) / 15, rel=0.25)
    assert homo["bp_p"] > 1e-3
    assert abs(homo["hetero_slope"]) < 0.01
    # Koenker LM = n * R^2 of e^2 on [1, age]
    e = rng.normal(0, 1 + t / 30)
    s = normality(e, t).scalars
    r2 = np.corrcoef(e * e, t)[0, 1] ** 2
    assert s["bp_stat"] == pytest.approx(t.size * r2, rel=1e-8)
    assert s["bp_p"] == pytest.approx(stats.chi2.sf(t.size * r2, 1), rel=1e-6)


def test_normality_without_ages_notes_heteroscedasticity():
    s = normality(np.random.default_rng(0).normal(size=50)).scalars
    assert math.isnan(s["bp_p"]) and "no true ages" in s.notes["bp_p"]


# ----------------------------------------------------------------------------- conformal


def test_conformal_quantile_rank():
    scores = np.arange(1.0, 10.0)  # n = 9
    assert conformal_quantile(scores, 0.9) == 9.0  # ceil(10 * 0.9) = 9
    assert conformal_quantile(scores, 0.8) == 8.0
    assert conformal_quantile(scores[:8], 0.9) == math.inf  # ceil(9 * 0.9) = 9 > 8
    big = np.arange(1.0, 1000.0)  # n = 999: (n + 1) * 0.9 = 900 exactly
    assert conformal_quantile(big, 0.9) == 900.0


def test_conformal_marginal_coverage_small_calibration():
    """Averaged over calibration draws, coverage is ceil((n+1)(1-a))/(n+1) >= 1 - a."""
    rng = np.random.default_rng(11)
    n, reps = 19, 4000
    calib = np.abs(rng.standard_t(3, (reps, n)))
    test = np.abs(rng.standard_t(3, reps))
    q = np.array([conformal_quantile(c, 0.9) for c in calib])
    assert np.mean(test <= q) == pytest.approx(18 / 20, abs=0.015)


def _split(rng: np.random.Generator, n: int, noise) -> tuple[np.ndarray, np.ndarray]:
    t = _ages(rng, n)
    return t, t + noise(t)


def test_conformal_exchangeable_coverage():
    rng = np.random.default_rng(21)
    tc, pc = _split(rng, 3000, lambda t: rng.normal(0, 4, t.size))
    tt, pt = _split(rng, 100_000, lambda t: rng.normal(0, 4, t.size))
    s, fitted = conformal_intervals(tc, pc, tt, pt)
    assert 0.88 <= s["conformal_90_coverage"] <= 0.94
    assert 0.88 <= s["conformal_band_90_coverage"] <= 0.94
    for level in (0.8, 0.9, 0.95):
        p = f"{level * 100:.0f}"
        assert s[f"conformal_{p}_coverage"] >= level - 0.02
        assert s[f"conformal_{p}_width"] == pytest.approx(2 * fitted[level].q)
    lo, hi = fitted[0.9].interval(pt)
    assert np.mean((lo <= tt) & (tt <= hi)) == s["conformal_90_coverage"]


@pytest.mark.parametrize("dist", ["gamma", "lognormal"])
@pytest.mark.parametrize("seed", range(3))
def test_conformal_skewed_residuals(dist, seed):
    rng = np.random.default_rng(seed)

    def noise(t):
        scale = 1 + t / 30  # skewed *and* heteroscedastic
        if dist == "gamma":
            return (rng.gamma(1.5, 2.0, t.size) - 3.0) * scale
        return (rng.lognormal(0.5, 0.8, t.size) - 2.0) * scale

    tc, pc = _split(rng, 2000, noise)
    tt, pt = _split(rng, 20_000, noise)
    s, _ = conformal_intervals(tc, pc, tt, pt, min_band_calib=50)
    for level in (0.8, 0.9, 0.95):
        p = f"{level * 100:.0f}"
        assert s[f"conformal_{p}_coverage"] >= level - 0.02
        assert s[f"conformal_band_{p}_coverage"] >= level - 0.02
    # bands adapt to the growing error: narrower than global for the young, wider for the old
    fitted = conformal_intervals(tc, pc, tt, pt)[1][0.9]
    own = [q for q, fb in zip(fitted.band_q, fitted.band_fallback, strict=True) if not fb]
    assert min(own) < fitted.q < max(own)


def test_pool_bands():
    counts = [0, 5, 198, 225, 10, 219, 155, 49, 13, 7, 1, 0]
    pools = _pool_bands(counts, 50)
    # sparse low end joins the first full band; the sparse high tail is pooled on its own
    assert pools == [[0, 1, 2], [3], [4, 5], [6], [7, 8, 9, 10, 11]]
    assert _pool_bands([3, 4], 50) == [[0, 1]]
    assert _pool_bands([60], 50) == [[0]]


@pytest.mark.parametrize("mode", ["merge", "global"])
def test_conformal_sparse_bands(mode):
    rng = np.random.default_rng(4)
    tc = np.concatenate(
        [rng.uniform(20, 28, 300), rng.uniform(62, 88, 200), rng.uniform(92, 98, 5)]
    )
    pc = tc + rng.uniform(-1, 1, tc.size)
    tt = rng.uniform(0, 100, 500)
    pt = tt + rng.normal(0, 2, tt.size)
    _, fitted = conformal_intervals(tc, pc, tt, pt, band_edges=[0, 30, 60, 90], sparse_bands=mode)
    ci = fitted[0.9]
    assert ci.band_labels == ["<0", "[0,30)", "[30,60)", "[60,90)", ">=90"]
    assert ci.band_n == (0, 300, 0, 200, 5)
    assert ci.band_fallback == (True, False, True, False, True)
    if mode == "global":
        assert ci.band_pool == ("all", "[0,30)", "all", "[60,90)", "all")
        assert ci.band_q[4] == ci.band_q[2] == ci.q
    else:
        assert ci.band_pool == ("<0..[0,30)",) * 2 + ("[30,60)..>=90",) * 3
        assert ci.band_q[0] == ci.band_q[1] and ci.band_q[2] == ci.band_q[3] == ci.band_q[4]
    assert np.all(np.isfinite(ci.half_width([95.0, -5.0, 45.0], banded=True)))
    everything = conformal_intervals(tc[:30], pc[:30], tt, pt, sparse_bands=mode)[1][0.9]
    assert set(everything.band_q) == {everything.q}  # too few points anywhere: global q


def test_banded_fallback_to_global_undercovers_extremes():
    """Why sparse bands are merged by default: the extreme predicted ages hold the big errors."""
    rng = np.random.default_rng(0)
    noise = lambda t: (rng.lognormal(0.5, 0.8, t.size) - 2.0) * (1 + t / 30)  # noqa: E731
    tc, pc = _split(rng, 2000, noise)
    tt, pt = _split(rng, 20_000, noise)
    merged = conformal_intervals(tc, pc, tt, pt)[0]["conformal_band_80_coverage"]
    global_ = conformal_intervals(tc, pc, tt, pt, sparse_bands="global")[0]
    assert merged >= 0.79 > global_["conformal_band_80_coverage"]


def test_conformal_small_calibration_gives_unbounded_interval_with_note():
    rng = np.random.default_rng(0)
    t = _ages(rng, 200)
    p = t + rng.normal(0, 3, t.size)
    d = evaluate(t, p, t[:5], p[:5])
    assert d.scalars["conformal_95_width"] == math.inf
    assert d.scalars["conformal_95_coverage"] == 1.0
    assert "too few for a finite 95% interval" in d.notes["conformal_95_width"]
    assert math.isfinite(d.scalars["conformal_80_width"])  # n=5 suffices for 80% (needs 4)


# ----------------------------------------------------------------------------- point metrics


def test_point_metrics_hand_example():
    t = np.array([10.0, 20.0, 30.0, 40.0])
    p = np.array([12.0, 18.0, 33.0, 40.0])  # e = [2, -2, 3, 0]
    s = point_metrics(t, p)
    assert s["mae"] == 1.75
    assert s["rmse"] == pytest.approx(math.sqrt(17 / 4))
    assert s["medae"] == 2.0
    assert s["bias"] == 0.75
    assert s["r2"] == pytest.approx(1 - 17 / 500)
    assert s["pearson_r"] == pytest.approx(stats.pearsonr(t, p).statistic)
    assert s["max_abs_error"] == 3.0
    assert all(type(v) is float for v in s.values())


def test_age_band_table():
    t = np.array([5.0, 15, 17, 25, 95])
    p = t + np.array([1.0, -1, 3, 0, -2])
    default = age_band_table(t, p)
    assert isinstance(default, pd.DataFrame)
    assert default["band"].tolist()[:3] == ["[0,10)", "[10,20)", "[20,30)"]
    assert default["count"].sum() == 5
    row = default.set_index("band").loc["[10,20)"]
    assert (row["count"], row["mae"], row["bias"]) == (2, 2.0, 1.0)
    assert default.set_index("band").loc["[50,60)", "count"] == 0  # empty inner band is listed
    custom = age_band_table(t, p, [10, 20, 50])
    assert custom["band"].tolist() == ["<10", "[10,20)", "[20,50)", ">=50"]
    assert custom["count"].tolist() == [1, 2, 1, 1]
    by_pred = age_band_table(t, p, [0, 16, 100], by="pred")
    assert by_pred["count"].tolist() == [2, 3]  # predictions 6, 14 | 20, 25, 93


def test_decade_edges_stay_few_for_absurd_ranges():
    assert M.decade_edges(np.array([3.0, 87.0])).tolist() == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    edges = M.decade_edges(np.array([-1e9, 5.0, 1e9]))
    assert len(edges) <= M.MAX_DEFAULT_BANDS + 1
    assert edges[0] <= -1e9 and edges[-1] > 1e9


# ----------------------------------------------------------------------------- API / names


def test_metric_names_documented_and_valid():
    rng = np.random.default_rng(0)
    t = _ages(rng, 400)
    p = t + rng.normal(0, 3, t.size)
    d = evaluate(t[:200], p[:200], t[200:], p[200:])
    assert list(d.scalars) == list(dict.fromkeys(d.scalars))
    assert set(d.scalars) == set(metric_names()) == set(METRIC_DOCS)
    for name, value in d.scalars.items():
        assert MLFLOW_KEY.match(name), name
        assert type(value) is float, name
    for name in ("coverage_at_1", "coverage_at_2", "coverage_at_3", "coverage_at_5"):
        assert name in d.scalars
    assert d.verdict in M.VERDICT_CODES
    assert isinstance(d.verdict_reason, str) and d.verdict_reason
    assert set(d.conformal) == {0.8, 0.9, 0.95}
    assert "MAE" in d.summary()


def test_custom_levels_names():
    rng = np.random.default_rng(0)
    t = _ages(rng, 300)
    p = t + rng.normal(0, 3, t.size)
    d = evaluate(t, p, t, p, conformal_levels=(0.5, 0.975))
    assert "conformal_97.5_coverage" in d.scalars and "conformal_band_50_width" in d.scalars
    assert set(d.scalars) == set(metric_names((0.5, 0.975)))


def test_no_calibration_split_gives_noted_nans():
    rng = np.random.default_rng(0)
    t = _ages(rng, 100)
    d = evaluate(t, t + rng.normal(0, 2, t.size))
    assert d.conformal == {}
    assert math.isnan(d.scalars["conformal_90_coverage"])
    assert d.notes["conformal_90_coverage"] == "no calibration split given"


def test_constant_residuals_do_not_crash():
    t = np.linspace(10, 80, 50)
    d = evaluate(t, t + 2.5, t, t + 2.5)
    s = d.scalars
    assert s["mae"] == pytest.approx(2.5) and s["bias"] == pytest.approx(2.5)
    assert s["coverage_at_mae"] == 1.0 and s["cs_gap_normal_fit"] == 0.0
    assert d.verdict == "undetermined"
    for name in ("shapiro_p", "skewness", "loglik_normal", "bp_p", "dagostino_p"):
        assert math.isnan(s[name]) and "constant" in d.notes[name]
    assert s["conformal_90_coverage"] == 1.0


def test_constant_truth_and_prediction():
    t = np.full(30, 40.0)
    p = np.random.default_rng(0).normal(40, 3, 30)
    d = evaluate(t, p)
    assert math.isnan(d.scalars["r2"]) and "y_true is constant" in d.notes["r2"]
    assert math.isnan(d.scalars["bp_p"]) and "constant" in d.notes["bp_p"]
    d2 = evaluate(p, np.full(30, 40.0))
    assert math.isnan(d2.scalars["pearson_r"]) and "y_pred is constant" in d2.notes["pearson_r"]


@pytest.mark.parametrize("n", [3, 4, 5, 7, 8, 12, 19, 21])
def test_small_samples_are_quiet_and_noted(n):
    rng = np.random.default_rng(n)
    t = _ages(rng, n)
    d = evaluate(t, t + rng.normal(0, 3, n), t, t + rng.normal(0, 3, n))
    for name, value in d.scalars.items():
        assert type(value) is float
        if math.isnan(value):
            assert name in d.notes, name
    if n < 8:
        assert "n >= 8" in d.notes["dagostino_p"]
    if n < 4:
        assert "n >= 4" in d.notes["lilliefors_p"]


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("args", "kwargs", "pattern"),
    [
        (([1, 2, 3], [1, 2]), {}, r"length mismatch: y_true_test has 3 .* y_pred_test has 2"),
        (([], []), {}, r"y_true_test is empty"),
        (([1, 2, 3], []), {}, r"y_pred_test is empty"),
        (([1, 2], [1, 2]), {}, r"too few points.*need at least 3"),
        (([1, 2, 3], [1, np.nan, 3]), {}, r"y_pred_test contains 1 non-finite.*index 1"),
        (([1, np.inf, 3], [1, 2, 3]), {}, r"y_true_test contains 1 non-finite"),
        (([1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, np.nan]), {}, r"y_pred_calib contains"),
        (([1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2]), {}, r"length mismatch: y_true_calib"),
        (([1, 2, 3], [1, 2, 3], [1, 2, 3]), {}, r"y_true_calib was given without y_pred_calib"),
        (([1, 2, 3], [1, 2, 3], None, [1, 2, 3]), {}, r"y_pred_calib was given without"),
        (([1, 2, 3], [1, 2, 3], [1, 2], [1, 2]), {}, r"too few points: y_true_calib"),
        ((np.ones((3, 2)), np.ones((3, 2))), {}, r"y_true_test must be a 1-D array"),
        ((["a", "b", "c"], [1, 2, 3]), {}, r"y_true_test must be numeric"),
        (([1, 2, 3], [1, 2, 1e12]), {}, r"y_pred_test contains 1 value\(s\) beyond"),
        (([1, 2, 3], [1, 2, 3]), {"k_max": 0}, r"k_max must be a positive integer"),
        (([1, 2, 3], [1, 2, 3]), {"conformal_levels": (0.9, 1.0)}, r"conformal_levels"),
        (([1, 2, 3], [1, 2, 3]), {"age_bands": [10, 5]}, r"age_bands must hold"),
    ],
)
def test_input_errors(args, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        evaluate(*args, **kwargs)


def test_building_block_input_errors():
    with pytest.raises(ValueError, match="too few points: residuals"):
        coverage_summary([1.0, 2.0])
    with pytest.raises(ValueError, match="residuals contains 1 non-finite"):
        normality([1.0, np.nan, 2.0, 3.0])
    with pytest.raises(ValueError, match="length mismatch: y_true has 2"):
        normality([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="by must be"):
        age_band_table([1, 2, 3], [1, 2, 3], by="age")


def test_column_vectors_are_accepted():
    t = np.linspace(5, 60, 20).reshape(-1, 1)
    s = point_metrics(t, t + 1)
    assert s["mae"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- property


finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.integers(min_value=3, max_value=60).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.float64, n, elements=finite),
            hnp.arrays(np.float64, n, elements=finite),
        )
    ),
    with_calib=st.booleans(),
)
def test_evaluate_property(data, with_calib):
    t, p = data
    calib = (t[::-1].copy(), p[::-1].copy()) if with_calib else (None, None)
    d = evaluate(t, p, *calib)
    assert set(d.scalars) == set(metric_names())
    for name, value in d.scalars.items():
        assert type(value) is float, name
        if math.isnan(value):
            assert name in d.notes, name
    assert d.verdict in M.VERDICT_CODES
    assert d.cs_curve["observed"].is_monotonic_increasing

"""The ablation report: planted effects recovered, no false alarms, incomplete studies, rendering.

Statistics are checked on synthetic run tables with effects of known size planted in them
(and on tables with no effect at all, for the family-wise error rate); the store path is
checked on a real (shrunken) demo study in a real MLflow store, and the HTML in headless
Chromium.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats
from statsmodels.stats.multitest import multipletests

from agelab.cli import main
from agelab.config import load_config
from agelab.metrics import NORMAL_CS_AT_MAE
from agelab.report import Design, analyse, holm, runs_table, t_interval
from agelab.report.render import write
from agelab.reporting import report_for_config
from agelab.study import run_study
from agelab.tracking import default_uri, runs_frame
from helpers import REPO

GRID = {
    "model.norm": ["batch", "none"],
    "model.act": ["relu", "tanh"],
    "model.backbone": ["resnet10t", "mobilenetv3_small_100"],
}


def planted_table(
    seed: int,
    *,
    seeds: int = 3,
    effect: dict[tuple[str, str], float] | None = None,
    interaction: float = 0.0,
    noise: float = 0.3,
    space: dict | None = None,
    calib_noise: float | None = 0.1,
    seed_sd: float = 0.5,
) -> tuple[pd.DataFrame, Design]:
    """Test MAE = 10 + planted effects + a per-seed offset + N(0, noise²) per run; the
    objective (best_calib_mae) is the run's test MAE + N(0, calib_noise²), as a model that is
    good on one split is good on the other (None: no calib MAE logged)."""
    space = space or GRID
    rng = np.random.default_rng(seed)
    calib_rng = np.random.default_rng([seed, 1])  # its own stream: test MAEs stay as they were
    design = Design.from_space(space, list(range(seeds)))
    offsets = rng.normal(0, seed_sd, seeds)  # shared by every run of a seed: pairing removes it
    rows = []
    for combo in itertools.product(*space.values()):
        cell = dict(zip(space, combo, strict=True))
        for s in range(seeds):
            mae = 10.0 + offsets[s] + rng.normal(0, noise)
            for (key, level), size in (effect or {}).items():
                mae += size if cell.get(key) == level else 0.0
            if cell.get("model.norm") == "none" and cell.get("model.act") == "tanh":
                mae += interaction
            cov = rng.normal(NORMAL_CS_AT_MAE, 0.01)
            rows.append(cell | {"seed": s, "mae": mae, "coverage_at_mae": cov, "verdict": "normal"})
    df = pd.DataFrame(rows)
    if calib_noise is not None:
        df["best_calib_mae"] = df["mae"] + calib_rng.normal(0, calib_noise, len(df))
    return df, design


def comparison(a, factor: str, b_level: str) -> pd.Series:
    c = a.comparisons
    return c[(c["factor"] == factor) & (c["level_b"] == b_level)].iloc[0]


# ------------------------------------------------------------------------ small statistics


def test_t_interval_and_holm_match_scipy_and_statsmodels() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(3, 2, 9)
    mean, lo, hi, n = t_interval(x, 0.9)
    ref = stats.t.interval(0.9, n - 1, loc=x.mean(), scale=stats.sem(x))
    assert n == 9 and mean == pytest.approx(x.mean())
    assert (lo, hi) == pytest.approx(ref)
    assert math.isnan(t_interval([4.0])[1]) and t_interval([])[3] == 0
    p = [0.01, 0.04, math.nan, 0.03, 0.2, 0.001]
    ours = holm(p)
    finite = [v for v in p if math.isfinite(v)]
    ref_adj = iter(multipletests(finite, method="holm")[1])
    for mine, raw in zip(ours, p, strict=True):
        if math.isfinite(raw):
            assert mine == pytest.approx(next(ref_adj))
        else:
            assert math.isnan(mine)


# ------------------------------------------------------------------------ planted effects


@pytest.mark.parametrize("seed", range(5))
def test_planted_main_effect_is_recovered_with_sign_and_size(seed: int) -> None:
    df, design = planted_table(seed, effect={("model.norm", "none"): -0.8})
    a = analyse(df, design)
    norm = comparison(a, "norm", "none")
    assert norm["significant"] and norm["diff"] < 0
    assert norm["lo"] <= -0.8 <= norm["hi"], "the interval covers the planted size"
    assert norm["n_pairs"] == 12 and "2 acts × 2 backbones × 3 seeds" in norm["strata"]
    anova = a.anova.set_index("term")
    assert anova.loc["norm", "significant"] and anova.loc["norm", "partial_eta_sq"] > 0.4
    assert not anova.loc["seed (block)", "significant"], "the block is never tested"
    text = " ".join(a.verdict)
    assert "norm = none instead of batch lowered test MAE by" in text
    # The planted norm effect is the only one: nothing else may be called significant.
    assert a.significant() == ["anova:norm", "norm:none-batch"]
    assert "act = tanh instead of relu: no detectable difference" in text
    norm_sentence = next(v for v in a.verdict if v.startswith("norm = none instead of batch"))
    assert "power (" not in norm_sentence, "power is for undecided tests only"
    assert a.best["best"]["model.norm"] == "none"


@pytest.mark.parametrize("seed", range(3))
def test_planted_interaction_is_reported_with_where_it_lives(seed: int) -> None:
    # tanh helps only without BatchNorm (the practitioner's claim, in its strict form).
    df, design = planted_table(seed, interaction=-1.2, noise=0.25)
    a = analyse(df, design)
    anova = a.anova.set_index("term")
    assert anova.loc["norm × act", "significant"]
    assert not anova.loc["norm × backbone", "significant"]
    text = " ".join(a.verdict)
    assert "The effect of norm depends on act" in text
    simple = a.simple_effects
    at_tanh = simple[(simple["factor"] == "norm") & (simple["at"] == "act=tanh")].iloc[0]
    at_relu = simple[(simple["factor"] == "norm") & (simple["at"] == "act=relu")].iloc[0]
    assert at_tanh["hi"] < 0, "without BN and with tanh the MAE is lower"
    assert at_relu["lo"] <= 0 <= at_relu["hi"], "with relu dropping BN does nothing"
    assert a.best["best"]["cell"].startswith("norm=none · act=tanh")


def test_small_effect_with_few_replicates_is_not_overclaimed() -> None:
    df, design = planted_table(0, seeds=2, effect={("model.act", "tanh"): -0.05}, noise=0.5)
    a = analyse(df, design)
    act = comparison(a, "act", "tanh")
    assert not act["significant"]
    sentence = next(v for v in a.verdict if v.startswith("act = tanh instead of relu"))
    assert "no detectable difference" in sentence


@pytest.mark.slow
def test_family_wise_false_positive_rate_on_null_tables() -> None:
    """100 seeded tables with no effect: how often does the report call anything significant?"""
    any_holm = any_raw = 0
    for seed in range(100):
        df, design = planted_table(1000 + seed)
        a = analyse(df, design)
        any_holm += bool(a.significant())
        raw = [*a.anova.loc[~a.anova["block"], "p"], *a.comparisons["p"]]
        any_raw += any(p < 0.05 for p in raw)
    assert any_holm / 100 <= 0.08, f"FWER {any_holm}%"
    # The correction is what keeps it there: uncorrected, ~9 tests a table alarm far more.
    assert any_raw / 100 > 0.15, f"uncorrected any-p<0.05 rate {any_raw}%"


def test_random_search_table_gets_regression_and_importances() -> None:
    from agelab.study import param_importances

    rng = np.random.default_rng(3)
    space = {"model.norm": ["batch", "none"], "train.lr": {"low": 1e-4, "high": 1e-1, "log": True}}
    design = Design.from_space(space, [0], sampler="random", n_trials=40)
    rows = []
    for _ in range(40):
        lr = float(np.exp(rng.uniform(np.log(1e-4), np.log(1e-1))))
        norm = str(rng.choice(["batch", "none"]))
        mae = 10 + 1.5 * (np.log10(lr) + 2.5) ** 2 + rng.normal(0, 0.3)  # best lr ~ 3e-3
        rows.append({"model.norm": norm, "train.lr": lr, "seed": 0, "mae": mae})
    df = pd.DataFrame(rows)
    imp = param_importances(space, df[["model.norm", "train.lr"]].to_dict("records"), df["mae"])
    assert imp is not None and max(imp, key=imp.get) == "train.lr"
    a = analyse(df, design, importances=imp)
    assert a.regression is not None and "log lr" in set(a.regression["term"])
    assert not a.anova.set_index("term").loc["norm", "significant"]
    text = " ".join(a.verdict)
    assert "fANOVA importance for test MAE: lr" in text
    assert "cannot be tested" in text  # random configurations share no pairs


def test_incomplete_study_says_what_is_missing(tmp_path: Path) -> None:
    df, design = planted_table(7, seeds=2)
    df["state"] = "COMPLETE"
    cell = (df["model.norm"] == "none") & (df["model.act"] == "tanh")
    df.loc[cell & (df["model.backbone"] == "resnet10t"), "state"] = "FAIL"
    df.loc[cell & (df["model.backbone"] == "resnet10t"), "reason"] = "error: diverged at epoch 1"
    df = df[~(cell & (df["model.backbone"] != "resnet10t") & (df["seed"] == 1))]
    a = analyse(df, design)
    missing = " | ".join(a.missing)
    assert "norm=none · act=tanh · backbone=resnet10t: no completed run; 2 failed" in missing
    assert "missing seed(s) 1" in missing
    assert "diverged at epoch 1" in missing
    assert f"of {design.planned} planned trials have no result" in missing
    text = " ".join(a.verdict)
    assert "2 failed" in text and "single replicate" in text
    md, html = write(a, tmp_path, meta={"study": "partial"})
    assert "What is missing" in md.read_text() and "no completed run" in html.read_text()


def test_one_replicate_everywhere_gives_no_intervals_and_says_so() -> None:
    df, design = planted_table(2, seeds=1, effect={("model.norm", "none"): -3.0})
    a = analyse(df, design)
    assert a.cells["mae_lo"].isna().all()
    text = " ".join(a.verdict)
    assert "single replicate" in text and "too few replicates to tell them apart" in text


def fake_run(i: int, params: dict, metrics: dict, *, state: str = "COMPLETE", seed=0, **tags):
    """An object shaped like an MLflow Run (what Tracker.search returns; runs_frame reads it)."""
    from types import SimpleNamespace

    key = " | ".join(f"{k}={v}" for k, v in sorted(params.items())) + f" | seed={seed}"
    status = {"COMPLETE": "FINISHED", "FAIL": "FAILED"}.get(state, "KILLED")
    return SimpleNamespace(
        info=SimpleNamespace(run_id=f"r{i}", run_name=f"run {i}", start_time=i, status=status),
        data=SimpleNamespace(
            tags={"agelab.state": state, "agelab.plan_key": key} | tags,
            params={k: str(v) for k, v in params.items()} | {"trial.seed": str(seed)},
            metrics=metrics,
        ),
    )


def test_runs_table_matches_levels_dedupes_retries_and_fills_gaps() -> None:
    design = Design.from_space({"model.drop_rate": [0, 0.2], "model.norm": ["batch"]}, [0, 1])
    runs = []
    for i, (rate, seed) in enumerate(itertools.product([0, 0.2], [0, 1])):
        r = fake_run(i, {"model.drop_rate": rate, "model.norm": "batch"}, {"mae": 5.0 + i},
                     seed=seed)  # fmt: skip
        r.data.params["model.drop_rate"] = str(float(rate))  # logged validated: "0.0"
        runs.append(r)
    # A crash then a retry of the same planned trial: one row, the completed attempt.
    crashed = fake_run(9, {"model.drop_rate": 0, "model.norm": "batch"}, {}, state="KILLED")
    crashed.data.params = {}  # killed before its params were logged: the plan key names it
    table = runs_table(runs_frame([crashed, *runs]), design)
    assert len(table) == 4 and set(table["state"]) == {"COMPLETE"}
    assert sorted(table["model.drop_rate"].tolist()) == [0, 0, 0.2, 0.2]
    assert table["attempts"].sum() == 5
    a = analyse(table, design)
    assert set(a.cells["cell"]) == {"drop_rate=0 · norm=batch", "drop_rate=0.2 · norm=batch"}
    assert not a.missing, a.missing
    assert comparison(a, "drop_rate", "0.2")["n_pairs"] == 2


def test_one_factor_grid_and_a_study_where_everything_failed(tmp_path: Path) -> None:
    design = Design.from_space({"model.norm": ["batch", "none", "layer"]}, [0, 1])
    runs = [
        fake_run(i, {"model.norm": n}, {"mae": 9.0 + i, "calib_mae": 9.0})
        for i, n in enumerate(["batch", "batch", "none", "none"])
    ]
    for i, r in enumerate(runs):
        r.data.params["trial.seed"] = str(i % 2)
        r.data.tags["agelab.plan_key"] += f"#{i}"
    a = analyse(runs_table(runs_frame(runs), design), design)
    assert sorted(a.cells["n"]) == [0, 2, 2]
    assert [m for m in a.missing if "no completed run" in m] == ["norm=layer: no completed run"]
    # Every trial failed: no test metric was ever logged, the report still says why.
    failed = [
        fake_run(i, {"model.norm": n}, {"calib_mae": 30.0}, state="FAIL",
                 **{"agelab.fail_reason": "error: diverged at epoch 1"})
        for i, n in enumerate(["batch", "none", "layer"])
    ]  # fmt: skip
    a = analyse(runs_table(runs_frame(failed), design), design)
    assert a.verdict[0].startswith("Based on 0 completed trial(s)") and "3 failed" in a.verdict[0]
    assert "nothing can be concluded" in a.verdict[1]
    assert any("diverged at epoch 1" in m for m in a.missing)
    write(a, tmp_path, meta={"study": "failed"})


def test_best_cell_uses_the_objective_not_the_last_epoch() -> None:
    design = Design.from_space({"model.norm": ["batch", "none"]}, [0])
    runs = [  # calib_mae's latest value is the last epoch's; best_calib_mae is the objective
        fake_run(0, {"model.norm": "batch"}, {"mae": 8.0, "calib_mae": 9.0, "best_calib_mae": 7.0}),
        fake_run(1, {"model.norm": "none"}, {"mae": 7.5, "calib_mae": 8.0, "best_calib_mae": 7.9}),
    ]
    a = analyse(runs_table(runs_frame(runs), design), design)
    assert a.best["by"] == "calib_mae" and a.best["best"]["cell"] == "norm=batch"


def test_tpe_repeats_all_count() -> None:
    design = Design.from_space({"model.norm": ["batch", "none"]}, [0], sampler="tpe", n_trials=4)
    runs = [fake_run(i, {"model.norm": "batch"}, {"mae": 8.0 + i}) for i in range(3)]
    runs.append(fake_run(3, {"model.norm": "none"}, {"mae": 9.0}))
    a = analyse(runs_table(runs_frame(runs), design), design)
    assert int(a.cells.set_index("cell").loc["norm=batch", "n"]) == 3
    assert not any("planned trials have no result" in m for m in a.missing)
    assert any("TPE chooses cells adaptively" in v for v in a.verdict)


def test_numeric_only_random_search_speaks_about_the_numeric_parameter() -> None:
    rng = np.random.default_rng(5)
    space = {"train.lr": {"low": 1e-4, "high": 1e-1, "log": True}}
    design = Design.from_space(space, [0], sampler="random", n_trials=30)
    lr = np.exp(rng.uniform(np.log(1e-4), np.log(1e-1), 30))
    df = pd.DataFrame({"train.lr": lr, "seed": 0, "mae": 10 + rng.normal(0, 0.3, 30)})
    a = analyse(df, design)
    assert any(v.startswith("log lr: no detectable effect on test MAE") for v in a.verdict)
    df["mae"] = 10 - 2.0 * np.log10(lr) + rng.normal(0, 0.3, 30)
    a = analyse(df, design)
    assert any(v.startswith("log lr affects test MAE") for v in a.verdict)


def test_odd_level_names_are_escaped_in_html(tmp_path: Path) -> None:
    space = {"model.act": ["<script>alert(1)</script>", "a & b"]}
    df, design = planted_table(0, seeds=2, space=space)
    a = analyse(df, design)
    _md, html = write(a, tmp_path, meta={"study": "odd", "description": "<b>bold</b>"})
    text = html.read_text(encoding="utf-8")
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "a &amp; b" in text and "<b>bold</b>" not in text


# ------------------------------------------------------------- best cell, power, shape, PM


def ranked_cells_table(
    seed: int, *, gap: float, noise: float, seeds: int = 5, seed_sd: float = 1.5
) -> tuple[pd.DataFrame, Design]:
    """norm × act with the best cell (batch, relu) at 10 years, the runner-up (none, tanh,
    differing in both factors) at 10 + gap and the other two at 12; a per-seed offset shared
    by every cell of a seed (sd ``seed_sd``) and N(0, noise²) per run; calib = test + N(0,
    0.01²)."""
    rng = np.random.default_rng(seed)
    space = {"model.norm": ["batch", "none"], "model.act": ["relu", "tanh"]}
    design = Design.from_space(space, list(range(seeds)))
    means = {("batch", "relu"): 10.0, ("none", "tanh"): 10.0 + gap}
    offsets = rng.normal(0, seed_sd, seeds)
    rows = []
    for norm, act in itertools.product(*space.values()):
        for s in range(seeds):
            mae = means.get((norm, act), 12.0) + offsets[s] + rng.normal(0, noise)
            rows.append({"model.norm": norm, "model.act": act, "seed": s, "mae": mae,
                         "best_calib_mae": mae + rng.normal(0, 0.01)})  # fmt: skip
    return pd.DataFrame(rows), design


def best_sentence(a) -> str:
    return next(v for v in a.verdict if v.startswith(("Best cell", "No run logged a calib")))


def test_runner_up_is_decided_by_the_paired_test_not_by_overlap() -> None:
    """The issue's case: 5 seeds sharing a large seed effect, a 0.32-year gap that the paired
    test sees at once (CI 0.29–0.37 here) while the two cells' intervals overlap widely."""
    df, design = ranked_cells_table(2, gap=0.32, noise=0.03)
    a = analyse(df, design)
    best, runner, test = a.best["best"], a.best["runner_up"], a.best["test"]
    assert (best["cell"], runner["cell"]) == ("norm=batch · act=relu", "norm=none · act=tanh")
    assert best["mae_lo"] <= runner["mae_hi"] and runner["mae_lo"] <= best["mae_hi"], (
        "the unpaired intervals overlap: the old rule would have said 'not distinguishable'"
    )
    assert 0.2 < test["lo"] < 0.32 < test["hi"] < 0.45 and test["p"] < 0.001
    assert test["n_pairs"] == 5 and test["differs"] == ["norm", "act"]
    assert test["significant"]
    text = best_sentence(a)
    assert "not distinguishable" not in text
    assert "It is ahead of the runner-up norm=none · act=tanh (" in text
    assert "paired over 5 seeds; the cells differ in norm and act" in text
    assert "best:norm=none · act=tanh-norm=batch · act=relu" in a.significant()


def test_best_vs_runner_up_is_one_more_test_in_the_holm_family() -> None:
    df, design = ranked_cells_table(4, gap=0.1, noise=0.1)
    a = analyse(df, design)
    family = [*a.anova.loc[~a.anova["block"], "p"], *a.comparisons["p"], a.best["test"]["p"]]
    assert a.family_size == len(family) == 6  # norm, act, norm × act; 2 comparisons; best
    ref = multipletests(family, method="holm")[1]
    assert a.best["test"]["p_holm"] == pytest.approx(ref[-1])
    assert a.comparisons["p_holm"].tolist() == pytest.approx(list(ref[3:5]))


def test_not_distinguishable_only_when_the_paired_test_says_so() -> None:
    """Over seeded tables with gaps from none to clear, the sentence follows the test."""
    said = {True: 0, False: 0}
    for seed in range(30):
        gap = (0.0, 0.08, 0.3)[seed % 3]
        a = analyse(*ranked_cells_table(100 + seed, gap=gap, noise=0.08))
        test, text = a.best["test"], best_sentence(a)
        said[test["significant"]] += 1
        if test["significant"]:
            assert "not distinguishable" not in text, text
        else:
            assert "is not distinguishable from it on test MAE" in text, text
            assert "power (two-sided" in text and "only for differences of at least" in text, text
    assert said[True] >= 5 and said[False] >= 5, said  # both branches exercised


def test_ranking_falls_back_to_test_mae_only_with_a_sentence() -> None:
    df, design = planted_table(5, calib_noise=None)
    a = analyse(df, design)
    assert a.best["by"] == "mae" and a.best["test"] is None
    text = best_sentence(a)
    assert text.startswith("No run logged a calib MAE (the objective), so cells are ranked by test")
    assert "is not tested against it" in text and "not distinguishable" not in text
    # One cell without a calib MAE: the others are still ranked by the objective, and it is named.
    df, design = planted_table(5)
    gone = (df["model.norm"] == "none") & (df["model.act"] == "tanh")
    df.loc[gone & (df["model.backbone"] == "resnet10t"), "best_calib_mae"] = math.nan
    a = analyse(df, design)
    assert a.best["by"] == "calib_mae"
    assert a.best["unranked"] == ["norm=none · act=tanh · backbone=resnet10t"]
    assert "Not ranked: 1 cell(s) whose runs logged no calib MAE" in best_sentence(a)


@pytest.mark.parametrize("n", [3, 5, 12, 40])
@pytest.mark.parametrize("alpha", [0.05, 0.005])
def test_power_formulas_match_statsmodels(n: int, alpha: float) -> None:
    from statsmodels.stats.power import TTestPower

    from agelab.report.stats import detectable_difference, paired_power, pairs_needed

    ref = TTestPower()
    for effect in (0.2, 0.8, 1.5):
        theirs = ref.power(effect, n, alpha)
        if math.isfinite(theirs):  # NaN where scipy's noncentral t gives up (tested below)
            assert paired_power(n, effect, alpha) == pytest.approx(theirs, abs=1e-9)
    sd = 0.7
    mine = detectable_difference(sd, n, alpha) / sd
    assert paired_power(n, mine, alpha) == pytest.approx(0.8, abs=1e-6)
    if math.isfinite(ref.power(mine, n, alpha)):  # their formula agrees
        assert ref.power(mine, n, alpha) == pytest.approx(0.8, abs=1e-6)
    theirs = ref.solve_power(effect_size=None, nobs=n, alpha=alpha, power=0.8)
    # solve_power's own root is off where its noncentral t turns NaN mid-search (n = 5,
    # alpha = 0.005: power 0.783 at its answer); compare where its answer is a root.
    if abs(ref.power(theirs, n, alpha) - 0.8) < 1e-6:
        assert mine == pytest.approx(theirs, rel=1e-4)
    effect = n * 0.02  # pairs needed well above 2
    need = pairs_needed(sd, effect, alpha)
    assert ref.power(effect / sd, need, alpha) == pytest.approx(0.8, abs=1e-6)
    want_n = ref.solve_power(effect_size=effect / sd, nobs=None, alpha=alpha, power=0.8)
    assert need == pytest.approx(want_n, rel=1e-3)


def test_power_where_scipy_gives_up_and_by_simulation() -> None:
    from agelab.report.stats import detectable_difference, paired_power, power_by_integral

    for n, effect, alpha in [(4, 4.0, 0.005), (12, 1.0, 0.05), (30, 0.3, 0.01)]:
        crit = stats.t.isf(alpha / 2, n - 1)
        ref = stats.nct.sf(crit, n - 1, effect * math.sqrt(n)) + stats.nct.cdf(
            -crit, n - 1, effect * math.sqrt(n)
        )
        assert power_by_integral(n - 1, crit, effect * math.sqrt(n)) == pytest.approx(ref, abs=1e-6)
    assert 0 < paired_power(2, 8.0, 0.005) < 0.2  # scipy's noncentral t returns NaN here
    assert paired_power(12, 4.0, 0.005) == pytest.approx(1.0)
    # At the detectable difference, a simulated paired t-test rejects 80 % of the time.
    mde = detectable_difference(1.0, 8, 0.01)
    d = np.random.default_rng(0).normal(mde, 1.0, (4000, 8))
    rate = np.mean(stats.ttest_1samp(d, 0.0, axis=1).pvalue < 0.01)
    assert abs(rate - 0.8) < 0.025, rate


def test_undecided_comparison_says_what_its_seeds_could_detect() -> None:
    from statsmodels.stats.power import TTestPower

    df, design = planted_table(0, effect={("model.act", "tanh"): -0.1})
    a = analyse(df, design, min_effect=0.25)
    assert a.family_size == 10 and a.power_alpha == pytest.approx(0.005)
    act = comparison(a, "act", "tanh")
    assert not act["significant"] and act["n_pairs"] == 12 and act["n_seeds"] == 3
    ref = TTestPower()
    mde = act["sd"] * ref.solve_power(effect_size=None, nobs=12, alpha=0.005, power=0.8)
    pairs = ref.solve_power(effect_size=0.25 / act["sd"], nobs=None, alpha=0.005, power=0.8)
    seeds = math.ceil(pairs / 4)  # 4 pairs per seed: 2 norms × 2 backbones
    assert act["mde"] == pytest.approx(mde, rel=1e-4) and act["seeds_needed"] == seeds
    sentence = next(v for v in a.verdict if v.startswith("act = tanh instead of relu"))
    assert (
        f"; 3 seeds (12 pairs) had 80 % power (two-sided, level 0.05/10 = 0.005) only for "
        f"differences of at least {mde:.2f} years; about {seeds} seeds would detect 0.25 years."
    ) in sentence
    # A larger min_effect the seeds can already detect is said as such.
    a = analyse(df, design, min_effect=5.0)
    sentence = next(v for v in a.verdict if v.startswith("act = tanh instead of relu"))
    assert "so a difference of 5 years would likely have been found" in sentence


@pytest.mark.slow
def test_the_seeds_the_report_asks_for_do_detect_the_effect() -> None:
    """Plant min_effect (0.25 years, paired sd 0.3·√2): the report on 3 seeds asks for about
    n seeds; tables with the n that the true sd gives detect it about 80 % of the time, and
    with half of them far less often (so the check can fail)."""
    from agelab.report.stats import power_of

    planted = {("model.act", "tanh"): -0.25}
    asked = [
        comparison(analyse(*planted_table(s, effect=planted, noise=0.3)), "act", "tanh")
        for s in range(300, 320)
    ]
    asked = [r["seeds_needed"] for r in asked if not r["significant"]]
    true_n = power_of(0.3 * math.sqrt(2), 12, 3, alpha=0.005, power=0.8, min_effect=0.25)
    n = int(true_n["seeds_needed"])
    assert 0.7 * n <= float(np.median(asked)) <= 1.4 * n, (asked, n)

    def detected(seeds: int) -> float:
        tables = (planted_table(s, seeds=seeds, effect=planted) for s in range(400, 440))
        return np.mean([comparison(analyse(*t), "act", "tanh")["significant"] for t in tables])

    # 0.81 over 150 tables (2026-11-30); 40 here: ≥ 0.65 is 3 standard errors below 0.8.
    assert detected(n) >= 0.65, f"with {n} seeds"
    assert detected(n // 2) <= 0.5, "half the seeds must detect it clearly less often"


def with_shape(df: pd.DataFrame, beta: float, seed: int = 0) -> pd.DataFrame:
    """Per-run shape metrics as the metrics module logs them, for a true shape ``beta``."""
    from agelab.metrics import coverage_at_mae_for_beta

    rng = np.random.default_rng(seed)
    b = beta + rng.normal(0, 0.05, len(df))
    out = df.assign(shape_beta=b, shape_beta_low=b - 0.1, shape_beta_high=b + 0.1)
    out["coverage_at_mae_gennorm"] = [coverage_at_mae_for_beta(x) for x in b]
    out["coverage_at_mae"] = out["coverage_at_mae_gennorm"] + rng.normal(0, 0.005, len(df))
    out["verdict"] = "between normal and laplace"
    return out.assign(years_for_50=3.1, years_for_80=6.2, conformal_90_width=16.0,
                      conformal_90_coverage=0.904)  # fmt: skip


def test_shape_beta_in_the_cells_the_sentence_and_the_figure(tmp_path: Path) -> None:
    from agelab.metrics import coverage_at_mae_for_beta
    from agelab.report.render import cells_table

    df, design = planted_table(1)
    a = analyse(with_shape(df, 1.3), design)
    sh = a.coverage["shape"]
    assert sh["n"] == 24 and sh["beta_lo"] < 1.3 < sh["beta_hi"]
    head, rows = cells_table(a)
    assert "shape β (95 % CI)" in head
    assert all(r[head.index("shape β (95 % CI)")].startswith("1.") for r in rows)
    sentence = next(v for v in a.verdict if v.startswith("Residual shape across 24 run(s)"))
    assert sh["predicted"] == pytest.approx(coverage_at_mae_for_beta(1.3), abs=0.002)
    assert f"With shape β ≈ {sh['beta']:.2f}, {100 * sh['predicted']:.1f} % fall within" in sentence
    assert "normal predicts 57.5 %, Laplace 63.2 %" in sentence
    # The sentence's share is the one its β predicts, not an average of other βs' shares.
    assert sh["predicted"] == coverage_at_mae_for_beta(np.array([sh["beta"]]))[0]
    # β is averaged on the log scale: one wild run (β = 8, a near-uniform fit) moves the
    # centre much less than it moves the arithmetic mean, and the interval stays above 0.
    wild = with_shape(df, 1.3)
    wild.loc[wild.index[0], "shape_beta"] = 8.0
    w = analyse(wild, design).coverage["shape"]
    arithmetic = wild["shape_beta"].mean()
    assert abs(w["beta"] - 1.3) < 0.5 * abs(arithmetic - 1.3) and w["beta_lo"] > 0
    md, _html = write(a, tmp_path, meta={"study": "shape"})
    fig = tmp_path / "figures" / "coverage_beta.png"
    assert fig.stat().st_size > 5_000 and "figures/coverage_beta.png" in md.read_text()
    # Runs logged before β existed: no column, no sentence, no figure, no crash.
    old = analyse(df, design)
    assert "shape β (95 % CI)" not in cells_table(old)[0]
    assert not any(v.startswith("Residual shape") for v in old.verdict)
    write(old, tmp_path / "old", meta={"study": "old"})
    assert not (tmp_path / "old" / "figures" / "coverage_beta.png").exists()


def test_the_best_cells_errors_in_plain_terms() -> None:
    df, design = planted_table(2, effect={("model.norm", "none"): -0.8})
    a = analyse(with_shape(df, 1.0), design)
    pm = next(v for v in a.verdict if v.startswith("In plain terms"))
    assert pm.startswith("In plain terms, the best cell (mean of its 3 runs, test split): ")
    assert "half of the faces within 3.10 years, 80 % within 6.20, 90 % within ±8.00 " in pm
    assert "it covered 90.4 % of the test faces" in pm
    # Runs without a conformal split's size (older runs): calibrated on calib, no promise.
    assert "calibrated on the calib split (its faces), which also chose the epoch" in pm
    assert "guarantee" not in pm
    # Calibrated on 120 conformal faces a run: 90 % on average, and on how many faces.
    sized = with_shape(df, 1.0).assign(n_conformal_split=120.0, n_calib_split=240.0)
    pm = next(v for v in analyse(sized, design).verdict if v.startswith("In plain terms"))
    assert "(split-conformal, calibrated on 120 faces a run that chose nothing: for new " in pm
    assert "90 % on average" in pm and "calib split" not in pm
    # A conformal split too small to calibrate on (< 3 faces): the calib split's 240 faces.
    small = sized.assign(n_conformal_split=2.0)
    pm = next(v for v in analyse(small, design).verdict if v.startswith("In plain terms"))
    assert "calibrated on the calib split (240 faces a run), which also chose the epoch" in pm
    assert not any(v.startswith("In plain terms") for v in analyse(df, design).verdict)
    # Too few calibration points: the width is infinite, logged by MLflow as 1.797e308.
    design = Design.from_space({"model.norm": ["batch", "none"]}, [0, 1])
    runs = [
        fake_run(i, {"model.norm": n}, {"mae": 9.0 + i, "best_calib_mae": 9.0 + i,
                 "years_for_50": 4.0, "conformal_90_width": 1.7976931348623157e308}, seed=s)
        for i, (n, s) in enumerate(itertools.product(["batch", "none"], [0, 1]))
    ]  # fmt: skip
    a = analyse(runs_table(runs_frame(runs), design), design)
    assert np.isposinf(a.runs["conformal_90_width"]).all()
    pm = next(v for v in a.verdict if v.startswith("In plain terms"))
    assert pm.endswith(
        "half of the faces within 4.00 years, no finite 90 % conformal interval (2 run(s) had "
        "too few calibration faces for one)."
    )


def test_the_report_says_what_a_replicate_varied(tmp_path: Path) -> None:
    from agelab.report import design_from_parent

    params = {
        "search.space": json.dumps({"model.norm": ["batch", "none"]}),
        "search.seeds": "[0, 1]",
    }
    assert design_from_parent(params).replicate_varies is None
    for logged in ('["init", "split"]', "['init', 'split']"):
        got = design_from_parent(params | {"search.replicate_varies": logged})
        assert got.replicate_varies == ["init", "split"]
    design = design_from_parent(params | {"search.replicate_varies": '["init"]'})
    runs = [
        fake_run(i, {"model.norm": n}, {"mae": 9.0 + i, "best_calib_mae": 9.0 + i}, seed=s)
        for i, (n, s) in enumerate(itertools.product(["batch", "none"], [0, 1]))
    ]
    for r in runs:
        r.data.params["data.split.seed"] = "0"
    a = analyse(runs_table(runs_frame(runs), design), design)
    md, _ = write(a, tmp_path, meta={"study": "varies"})
    text = md.read_text()
    assert "A replicate seed varied the initialisation, batch order and augmentation " in text
    assert "not the data split (every replicate used the same one)" in text
    assert "The completed runs used 1 distinct data split(s)." in text
    design.replicate_varies = ["init", "split"]
    for r, split in zip(runs, [10, 11, 10, 11], strict=True):
        r.data.params["data.split.seed"] = str(split)
    a = analyse(runs_table(runs_frame(runs), design), design)
    md, _ = write(a, tmp_path, meta={"study": "varies"})
    text = md.read_text()
    assert (
        "and the data split (data.split.seed); every cell of one replicate shares its seed" in text
    )
    assert "used 2 distinct data split(s)" in text
    design.replicate_varies = None  # a study that predates the setting
    md, _ = write(analyse(runs_table(runs_frame(runs), design), design), tmp_path, meta={})
    assert text.count("A replicate seed varied") == 2  # cells note and How to read this
    assert "augmentation only (train.seed): every replicate used the same data split" in (
        md.read_text()
    )


def test_report_config_min_effect_and_power() -> None:
    from pydantic import ValidationError

    from agelab.config import ReportConfig

    assert ReportConfig().min_effect == 0.25 and ReportConfig().power == 0.8
    for bad in ({"min_effect": 0}, {"power": 1.0}, {"power": 0.3}):
        with pytest.raises(ValidationError):
            ReportConfig(**bad)
    cfg = load_config(REPO / "experiments" / "demo.yaml", ["report.min_effect=0.5"])
    assert cfg.report.min_effect == 0.5


# ----------------------------------------------------------------- a real study and store


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory: pytest.TempPathFactory):
    """The demo study (experiments/demo.yaml) shrunk to seconds a trial, in a real store."""
    tmp = tmp_path_factory.mktemp("demo-report")
    overrides = [
        "data.image_size=32",
        "data.synthetic.n_images=240",
        "train.epochs=1",
        "train.batch_size=32",
        "train.threads=1",
        "train.progress=false",
        f"tracking.root={tmp / 'mlruns'}",
    ]
    cfg = load_config(REPO / "experiments" / "demo.yaml", overrides)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AGELAB_CACHE_DIR", str(tmp / "cache"))
        # As a user runs it: `agelab run` writes the report when the study ends.
        assert main(["run", str(REPO / "experiments" / "demo.yaml"), *overrides, "--quiet"]) == 0
    return cfg


@pytest.mark.slow
def test_study_end_writes_and_logs_the_report(demo_study) -> None:
    cfg = demo_study
    folder = cfg.tracking.root / "reports" / "demo"
    md = (folder / "report.md").read_text()
    assert "## Verdict" in md and "Based on 8 completed trial(s) in 4 cell(s) of 8 planned" in md
    for fig in ("heatmap", "interaction", "comparisons", "coverage", "coverage_beta", "cs_curves"):
        assert (folder / "figures" / f"{fig}.png").stat().st_size > 5_000, fig
    # What the intervals cover, the shape β and the best cell in plain terms, from real runs.
    assert "A replicate seed varied the initialisation, batch order and augmentation " in md
    assert "and the data split (data.split.seed)" in md and "2 distinct data split(s)" in md
    assert "| shape β (95 % CI) |" in md and "- Residual shape across 8 run(s)" in md
    assert "- In plain terms, the best cell (mean of its 2 runs, test split): half of" in md
    runs = pd.read_csv(folder / "runs.csv")
    assert len(runs) == 8 and set(runs["state"]) == {"COMPLETE"}
    client = MlflowClient(default_uri(cfg.tracking))
    exp = client.get_experiment_by_name("demo")
    parent = next(
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("agelab.run_kind") == "study"
    )
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/figures"} <= logged
    # Numbers in the report are the runs' own numbers.
    trial_mae = sorted(
        r.data.metrics["mae"]
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("agelab.run_kind") == "trial"
    )
    assert sorted(runs["mae"]) == pytest.approx(trial_mae)


@pytest.mark.slow
def test_report_command_by_name_and_its_errors(demo_study, tmp_path: Path, capsys) -> None:
    cfg = demo_study
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    out = tmp_path / "r"
    by_name = subprocess.run(
        [sys.executable, "-m", "agelab.cli", "report", "demo", "--root", str(cfg.tracking.root),
         "--out", str(out), "--no-log", "report.confidence=0.9"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert by_name.returncode == 0, by_name.stderr
    assert "Verdict:" in by_name.stdout and "90 % CI" in by_name.stdout
    assert (out / "report.html").is_file() and (out / "report.md").is_file()

    assert main(["report", "no-such-study", "--root", str(cfg.tracking.root)]) == 2
    err = capsys.readouterr().err
    assert "no MLflow experiment 'no-such-study'" in err and "(it has: demo)" in err
    assert main(["report", "demo", "--root", str(tmp_path / "empty")]) == 2
    assert "no tracking store at" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists(), "reading a report must not create a store"


@pytest.mark.slow
def test_partial_real_study_report(tmp_path: Path, monkeypatch) -> None:
    import agelab.train as train
    from agelab.config import validate
    from agelab.errors import TrainingDiverged
    from helpers.studies import tiny_study

    real_fit = train.fit

    def diverges_without_norm_on_seed_1(model, data, cfg, callbacks=(), **kw):
        if cfg.seed == 1 and not any("BatchNorm" in type(m).__name__ for m in model.modules()):
            raise TrainingDiverged(epoch=1, step=3, lr=1e-3)
        return real_fit(model, data, cfg, callbacks, **kw)

    monkeypatch.setattr(train, "fit", diverges_without_norm_on_seed_1)
    cfg = validate(tiny_study(tmp_path, name="partial", search={"seeds": [0, 1]}))
    run_study(cfg, quiet=True)
    result = report_for_config(cfg, log=False)
    a = result.analysis
    assert int((a.runs["state"] == "FAIL").sum()) == 2
    assert any("missing seed(s) 1" in m for m in a.missing)
    assert any("diverged" in m for m in a.missing)
    norm = comparison(a, "norm", "none")
    assert norm["n_pairs"] == 2  # only seed 0 pairs exist
    assert "2 failed" in a.verdict[0]


@pytest.mark.browser
@pytest.mark.slow
def test_report_html_renders_in_chromium(chromium, demo_study, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    from agelab.reporting import report_for_config as again
    from helpers.browser import page_text, wait_until

    result = again(demo_study, log=False, out_dir=tmp_path / "report")
    chromium.set_window_size(1280, 2400)
    chromium.get(result.html.resolve().as_uri())  # returns once the page (and images) loaded
    wait_until(chromium, lambda d: d.find_elements(By.ID, "verdict"), "the verdict")
    verdict = [li.text for li in chromium.find_elements(By.CSS_SELECTOR, "ul.verdict li")]
    assert verdict == result.analysis.verdict
    images = chromium.execute_script(
        "return [...document.querySelectorAll('figure img')].map(i => "
        "[i.closest('figure').id, i.complete && i.naturalWidth > 0 && i.naturalHeight > 0])"
    )
    names = {name for name, ok in images if ok}
    assert {"fig-heatmap", "fig-interaction", "fig-coverage", "fig-cs_curves"} <= names, images
    assert all(ok for _name, ok in images)
    assert "Paired comparisons" in page_text(chromium)
    shot = REPO / "test-artifacts" / "report.png"
    shot.parent.mkdir(exist_ok=True)
    assert chromium.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000

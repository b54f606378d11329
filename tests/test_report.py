"""The ablation report: planted effects recovered, no false alarms, incomplete studies, rendering.

Statistics are checked on synthetic run tables with effects of known size planted in them
(and on tables with no effect at all, for the family-wise error rate); the store path is
checked on a real (shrunken) demo study in a real MLflow store, and the HTML in headless
Chromium.
"""

from __future__ import annotations

import itertools
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
) -> tuple[pd.DataFrame, Design]:
    """Test MAE = 10 + planted effects + a per-seed offset + N(0, noise²) per run."""
    space = space or GRID
    rng = np.random.default_rng(seed)
    design = Design.from_space(space, list(range(seeds)))
    offsets = rng.normal(0, 0.5, seeds)  # shared by every run of a seed: pairing removes it
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
    return pd.DataFrame(rows), design


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
    for fig in ("heatmap", "interaction", "comparisons", "coverage", "cs_curves"):
        assert (folder / "figures" / f"{fig}.png").stat().st_size > 5_000, fig
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

"""Studies end to end on a real MLflow store (SQLite) and real Optuna storage (journal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from agelab.config import validate
from agelab.metrics import VERDICT_CODES
from agelab.study import (
    A_KEY,
    A_RUN,
    open_storage,
    open_study,
    planned_trials,
    run_study,
    storage_url,
)
from agelab.tracking import default_uri
from helpers import REPO
from helpers.studies import tiny_study


def study_and_runs(cfg):
    study = open_study(cfg, open_storage(storage_url(cfg)))
    client = MlflowClient(default_uri(cfg.tracking))
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = [r for r in runs if r.data.tags.get("agelab.run_kind") == "trial"]
    parents = [r for r in runs if r.data.tags.get("agelab.run_kind") == "study"]
    return study, trials, parents, client


@pytest.mark.slow
def test_smoke_study_records_everything(tmp_path: Path) -> None:
    cfg = validate(
        tiny_study(tmp_path, tracking={"root": str(tmp_path / "mlruns"), "log_figures": True})
    )
    summary = run_study(cfg, quiet=True)
    assert summary.ok and summary.counts["COMPLETE"] == 4

    study, trials, parents, client = study_and_runs(cfg)
    assert len(parents) == 1 and len(trials) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    for tag in (
        "agelab.sampler",
        "agelab.config_hash",
        "agelab.git_commit",
        "torch.version",
        "timm.version",
        "agelab.dataset_fingerprint",
        "agelab.device",
    ):
        assert parent.data.tags.get(tag), tag
    by_run = {t.user_attrs[A_RUN]: t for t in study.get_trials()}
    cells = set()
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        trial = by_run[run.info.run_id]  # the Optuna trial knows its run, and vice versa
        assert int(run.data.tags["agelab.trial_number"]) == trial.number
        assert run.info.run_name.startswith("resnet10t · ") and run.info.run_name.endswith("seed 0")
        m = run.data.metrics
        for key in (
            "mae",
            "calib_mae",
            "coverage_at_mae",
            "coverage_at_5",
            "cs_gap_normal",
            "cs_gap_laplace",
            "shapiro_p",
            "conformal_90_coverage",
            "train_loss",
        ):
            assert key in m, key
        assert m["best_calib_mae"] == pytest.approx(trial.value)
        assert run.data.params["model.norm"] == trial.user_attrs["params"]["model.norm"]
        assert "census.requested.norm" in run.data.tags or any(
            k.startswith("census.") for k in run.data.tags
        )
        assert run.data.tags["agelab.verdict"] in VERDICT_CODES
        # where the conformal intervals were calibrated, consistent with the split sizes
        on = "conformal" if m["n_conformal_split"] >= 3 else "calib"
        assert run.data.tags["agelab.conformal_calibrated_on"] == on, m["n_conformal_split"]
        history = client.get_metric_history(run.info.run_id, "calib_mae")
        assert len(history) >= 2  # one per epoch + the final value
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "census.json", "predictions.csv", "figures"} <= names
        figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert any("qq" in f for f in figures) and any(
            "kernel" in f or "filter" in f for f in figures
        )
        cells.add(run.data.tags["agelab.cell"])
    assert len(cells) == 4


def test_rerun_continues_and_never_repeats(tmp_path: Path) -> None:
    cfg = validate(tiny_study(tmp_path))
    first = run_study(cfg, quiet=True, n_trials=2)
    assert first.counts["COMPLETE"] == 2 and first.counts["WAITING"] == 2
    second = run_study(cfg, quiet=True)
    assert second.counts["COMPLETE"] == 4 and second.counts["WAITING"] == 0
    third = run_study(cfg, quiet=True)  # nothing left: no new trial
    assert third.counts["COMPLETE"] == 4
    study, trials, parents, _ = study_and_runs(cfg)
    assert len(trials) == 4 and len(parents) == 3
    keys = [t.user_attrs[A_KEY] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert len(keys) == len(set(keys)) == 4


def test_failed_trial_is_recorded_and_study_goes_on(tmp_path: Path, monkeypatch) -> None:
    import agelab.train as train
    from agelab.errors import TrainingDiverged

    real_fit = train.fit

    def fit_that_diverges_without_norm(model, data, cfg, callbacks=(), **kw):
        if not any("BatchNorm" in type(m).__name__ for m in model.modules()):
            raise TrainingDiverged(epoch=1, step=3, lr=1e-3)
        return real_fit(model, data, cfg, callbacks, **kw)

    monkeypatch.setattr(train, "fit", fit_that_diverges_without_norm)
    cfg = validate(tiny_study(tmp_path))
    summary = run_study(cfg, quiet=True)
    assert summary.counts["COMPLETE"] == 2 and summary.counts["FAIL"] == 2
    _study, trials, _, _ = study_and_runs(cfg)
    failed = [r for r in trials if r.info.status == "FAILED"]
    assert len(failed) == 2
    assert all("diverged" in r.data.tags["agelab.fail_reason"] for r in failed)
    # A re-run does not retry a deterministic failure.
    again = run_study(cfg, quiet=True)
    assert again.counts["FAIL"] == 2 and again.counts["COMPLETE"] == 2


def test_one_cell_grid_runs(tmp_path: Path) -> None:
    cfg = validate(tiny_study(tmp_path, search={"space": {"model.norm": ["batch"]}}))
    assert run_study(cfg, quiet=True).counts["COMPLETE"] == 1


def test_random_plan_is_seeded_replicated_and_in_range(tmp_path: Path) -> None:
    raw = tiny_study(
        tmp_path,
        search={
            "sampler": "random",
            "n_trials": 5,
            "seeds": [0, 1],
            "sampler_seed": 3,
            "space": {
                "model.norm": ["batch", "group", "none"],
                "train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
            },
        },
    )
    cfg = validate(raw)
    plan = planned_trials(cfg)
    assert plan == planned_trials(cfg) and len(plan) == 10
    assert all(1e-4 <= p["train.lr"] <= 1e-2 for p in plan)
    assert Counter(p["seed"] for p in plan) == {0: 5, 1: 5}
    other = validate({**raw, "search": {**raw["search"], "sampler_seed": 4}})
    assert planned_trials(other) != plan


def test_tpe_study_runs_adaptively(tmp_path: Path) -> None:
    cfg = validate(
        tiny_study(
            tmp_path,
            search={
                "sampler": "tpe",
                "n_trials": 2,
                "space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
            },
        )
    )
    summary = run_study(cfg, quiet=True)
    assert summary.counts["COMPLETE"] == 2


@pytest.mark.slow
def test_four_workers_share_a_16_cell_grid(tmp_path: Path) -> None:
    cfg = validate(
        tiny_study(
            tmp_path,
            search={
                "seeds": [0],
                "space": {
                    "model.norm": ["batch", "group", "layer", "none"],
                    "model.act": ["relu", "tanh", "gelu", "silu"],
                },
            },
        )
    )
    summary = run_study(cfg, workers=4, quiet=True)
    assert summary.counts["COMPLETE"] == 16 and summary.counts["FAIL"] == 0
    study, trials, _, _ = study_and_runs(cfg)
    keys = [t.user_attrs[A_KEY] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert len(set(keys)) == 16
    assert Counter(r.info.status for r in trials) == {"FINISHED": 16}
    assert len({r.data.tags["agelab.cell"] for r in trials}) == 16


@pytest.mark.slow
def test_sigkill_mid_trial_then_resume(tmp_path: Path) -> None:
    raw = tiny_study(tmp_path, train={"epochs": 3})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = validate(raw)
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agelab.cli", "run", str(path), "--quiet"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )
    storage = open_storage(storage_url(cfg))
    deadline = time.time() + 240
    killed = False
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            study = open_study(cfg, storage)
        except Exception:
            continue
        done = study.get_trials(states=(TrialState.COMPLETE,))
        running = [
            t for t in study.get_trials(states=(TrialState.RUNNING,)) if A_RUN in t.user_attrs
        ]
        if done and running:
            time.sleep(1.0)  # well inside the second trial
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=30)
    assert killed, "the study finished or stalled before it could be killed"

    summary = run_study(cfg, quiet=True)
    assert summary.counts["COMPLETE"] == 4
    study, trials, parents, _ = study_and_runs(cfg)
    keys = [t.user_attrs[A_KEY] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert sorted(keys) == sorted(set(keys))
    statuses = Counter(r.info.status for r in trials + parents)
    assert statuses.get("RUNNING", 0) == 0
    assert Counter(r.info.status for r in trials)["FINISHED"] == 4
    assert any(r.info.status == "KILLED" for r in trials)  # the killed trial's run, closed

"""Studies on a real PostgreSQL server: Optuna storage and MLflow backend store both on it.

Needs the Debian package ``postgresql`` (``make sysdeps``); skips with the reason otherwise.
The server is started by pytest-postgresql (``tests/helpers/postgres.py``).
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from pytest_postgresql.executors import PostgreSQLExecutor

from agelab.config import validate
from agelab.study import A_KEY, A_REASON, open_storage, open_study, run_study, storage_url
from agelab.tracking import TAG_REASON, default_uri
from helpers.postgres import PgUnavailable, execute, postgres_server, url
from helpers.studies import tiny_study

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

GRID_16 = {
    "model.norm": ["batch", "group", "layer", "none"],
    "model.act": ["relu", "tanh", "gelu", "silu"],
}


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgreSQLExecutor]:
    """One private PostgreSQL server for the session, with databases optuna and mlflow."""
    try:
        with postgres_server("optuna", "mlflow") as server:
            yield server
    except PgUnavailable as exc:
        pytest.skip(str(exc))


def study_and_runs(cfg):
    study = open_study(cfg, open_storage(storage_url(cfg)))
    client = MlflowClient(default_uri(cfg.tracking))
    exp = client.get_experiment_by_name(cfg.tracking.experiment or cfg.name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = [r for r in runs if r.data.tags.get("agelab.run_kind") == "trial"]
    parents = [r for r in runs if r.data.tags.get("agelab.run_kind") == "study"]
    return study, trials, parents


def test_four_workers_share_a_16_cell_grid_on_postgres(
    tmp_path: Path, postgres: PostgreSQLExecutor, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = validate(
        tiny_study(
            tmp_path,
            name="pg-grid",
            search={"seeds": [0], "space": GRID_16},
            tracking={
                "root": str(tmp_path / "mlruns"),
                "log_figures": False,
                "storage": url(postgres, "optuna"),
                "uri": url(postgres, "mlflow"),
            },
        )
    )
    summary = run_study(cfg, workers=4, quiet=True)
    out, err = capfd.readouterr()  # the workers' output too (they inherit our fds)
    logs = out + err

    assert summary.ok, logs
    assert summary.counts["COMPLETE"] == 16, (summary.counts, logs)
    assert summary.counts["FAIL"] == 0 and summary.counts["WAITING"] == 0, summary.counts
    assert "database is locked" not in logs.lower()
    assert "Traceback" not in logs, logs
    assert "warning: worker exit codes" not in logs, logs

    study, trials, parents = study_and_runs(cfg)
    # Optuna: 16 finished trials, each a distinct planned cell, none failed.
    all_trials = study.get_trials()
    assert Counter(t.state for t in all_trials) == {TrialState.COMPLETE: 16}
    keys = [t.user_attrs[A_KEY] for t in all_trials]
    assert len(keys) == len(set(keys)) == 16, Counter(keys).most_common(3)
    assert not [t.user_attrs[A_REASON] for t in all_trials if A_REASON in t.user_attrs]
    cells = {
        (t.user_attrs["params"]["model.norm"], t.user_attrs["params"]["model.act"])
        for t in all_trials
    }
    assert cells == {(n, a) for n in GRID_16["model.norm"] for a in GRID_16["model.act"]}

    # MLflow (on PostgreSQL): one finished parent, 16 finished nested runs, one per cell.
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert Counter(r.info.status for r in trials) == {"FINISHED": 16}
    parent_id = parents[0].info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == parent_id for r in trials)
    run_cells = [r.data.tags["agelab.cell"] for r in trials]
    assert len(set(run_cells)) == 16, Counter(run_cells).most_common(3)
    assert not [r.data.tags[TAG_REASON] for r in trials if TAG_REASON in r.data.tags]
    assert all("mae" in r.data.metrics and "coverage_at_mae" in r.data.metrics for r in trials)
    # The Optuna trial and the MLflow run point at each other.
    run_ids = {r.info.run_id for r in trials}
    assert {t.user_attrs["mlflow_run_id"] for t in all_trials} == run_ids
    assert parents[0].data.metrics["trials_complete"] == 16


def test_password_in_store_uris_is_masked(
    tmp_path: Path, postgres: PostgreSQLExecutor, capfd: pytest.CaptureFixture[str]
) -> None:
    user = "agelab_pw"
    password = "pw-" + secrets.token_hex(8)
    # Authentication is `trust`, so the password is not checked; it is in the URIs all the
    # same, as it would be on a real server, and must never be recorded.
    execute(
        postgres,
        f"CREATE ROLE {user} LOGIN PASSWORD '{password}'",
        f"CREATE DATABASE optuna_pw OWNER {user}",
        f"CREATE DATABASE mlflow_pw OWNER {user}",
    )
    storage = url(postgres, "optuna_pw", user=user, password=password)
    uri = url(postgres, "mlflow_pw", user=user, password=password)
    assert password in storage and password in uri

    cfg = validate(
        tiny_study(
            tmp_path,
            name="pg-secret",
            search={"seeds": [0], "space": {"model.norm": ["batch", "none"]}},
            tracking={
                "root": str(tmp_path / "mlruns"),
                "log_figures": False,
                "log_model": "all",  # the MLflow Models' files are scanned too
                "storage": storage,
                "uri": uri,
            },
        )
    )
    summary = run_study(cfg, quiet=True)
    assert summary.counts["COMPLETE"] == 2

    _study, trials, parents = study_and_runs(cfg)
    assert len(parents) == 1 and len(trials) == 2
    parent = parents[0]
    # The storage is recorded, masked, so a reader knows where the trials live.
    assert parent.data.tags["optuna.storage"] == storage.replace(password, "***")

    def recorded(run) -> list[tuple[str, str]]:
        return [(f"tag {k}", v) for k, v in run.data.tags.items()] + [
            (f"param {k}", v) for k, v in run.data.params.items()
        ]

    for kind, run in [("parent", parent)] + [("trial", r) for r in trials]:
        leaked = [f"{k}={v}" for k, v in recorded(run) if password in k or password in v]
        assert not leaked, f"password recorded on the {kind} run: {leaked}"
        # Wherever a store URI is recorded, its password reads ***.
        for key, value in recorded(run):
            if f"{user}:" in value:
                assert f"{user}:***@" in value, f"{kind} {key}={value}"
    printed = capfd.readouterr()
    assert password not in printed.out + printed.err
    # Nor in any artifact: configs, checkpoints, reports, MLflow Models (MLmodel, code, JSON).
    files = [f for f in (tmp_path / "mlruns").rglob("*") if f.is_file()]
    assert any(f.name == "MLmodel" for f in files), "no MLflow Model was logged"
    assert not [f for f in files if password.encode() in f.read_bytes()]

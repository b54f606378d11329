"""A study through a real MLflow tracking server, as docs/scaling.md sets one up for many
machines: PostgreSQL (one database for MLflow, one for Optuna: both keep their schema
version in a table named ``alembic_version``, so they cannot share one), ``mlflow server``
over the MLflow database serving the artifacts itself (``--serve-artifacts``), and
``agelab run --workers 3`` with only ``MLFLOW_TRACKING_URI=http://…`` and
``AGELAB_OPTUNA_STORAGE=postgresql+psycopg2://…`` set. Then ``agelab report`` reads it all
back through the server, and the server's REST API, artifact proxy and UI are asked as a
person's browser would.

Needs the Debian package ``postgresql`` (``make sysdeps``); skips with the reason otherwise.
The browser test needs ``chromium`` and ``chromium-driver`` too. Nothing of the server or
the database may outlive the module: the fixture checks every process of both is gone.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient
from selenium.webdriver.remote.webdriver import WebDriver

from agelab.config import load_config
from agelab.study import plan_key, planned_trials
from agelab.tracking import TAG_KIND, TAG_STATE
from agelab.ui import runs_url
from helpers import REPO
from helpers.browser import page_text, wait_until
from helpers.invariants import assert_study_consistent, write_study
from helpers.postgres import PgUnavailable, execute, postgres_server, url
from helpers.tracking_server import Server, descendants, mlflow_server, wait_gone

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

USER = "agelab_srv"
PASSWORD = "pw-" + secrets.token_hex(8)
SPACE = {"model.norm": ["batch", "group", "none"], "model.act": ["relu", "tanh"]}  # 6 cells
WORKERS = 3


@dataclass
class Served:
    server: Server
    optuna: str  # the Optuna storage URI, password included
    root: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """PostgreSQL with databases ``mlflow`` and ``optuna`` (owned by a role with a password),
    and ``mlflow server`` over the first. Afterwards no process of either may be alive."""
    root = tmp_path_factory.mktemp("tracking-server")
    try:
        with postgres_server() as pg:
            execute(
                pg,
                f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'",
                f"CREATE DATABASE mlflow OWNER {USER}",
                f"CREATE DATABASE optuna OWNER {USER}",
            )
            postmaster = int((Path(pg.datadir) / "postmaster.pid").read_text().split()[0])
            database = [postmaster, *descendants(postmaster)]
            backend = url(pg, "mlflow", user=USER, password=PASSWORD)
            with mlflow_server(backend, root / "mlartifacts", root / "server.log") as server:
                serving = [server.pid, *descendants(server.pid)]
                yield Served(server, url(pg, "optuna", user=USER, password=PASSWORD), root)
            wait_gone(serving, "the MLflow server")
    except PgUnavailable as exc:
        pytest.skip(str(exc))
    wait_gone(database, "PostgreSQL")


@dataclass
class Study:
    path: Path
    experiment_id: str
    run_out: str  # what `agelab run` printed
    report_out: str


def agelab(*args: str, env: dict[str, str], timeout: float = 400) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "agelab.cli", *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"agelab {' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def served_study(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    """A 6-cell grid run by 3 worker processes through the server, then its report."""
    root = tmp_path_factory.mktemp("served-study")
    path = write_study(root, "served", search={"space": SPACE})
    stores = {"MLFLOW_TRACKING_URI": served.server.base, "AGELAB_OPTUNA_STORAGE": served.optuna}
    env = os.environ | stores | {"PYTHONPATH": str(REPO / "src")}
    run_out = agelab("run", str(path), "--workers", str(WORKERS), "--quiet", env=env)
    report_out = agelab("report", str(path), env=env)
    exp = served.server.api(f"experiments/get-by-name?experiment_name={quote('served')}")
    # The checks in this process read the same stores (conftest unsets both variables).
    with pytest.MonkeyPatch.context() as mp:
        for key, value in stores.items():
            mp.setenv(key, value)
        yield Study(path, exp["experiment"]["experiment_id"], run_out, report_out)


def test_three_workers_through_a_tracking_server_on_postgres(
    served: Served, served_study: Study, tmp_path: Path
) -> None:
    s, server = served_study, served.server
    assert "Traceback" not in s.run_out + s.report_out, s.run_out + s.report_out
    # Every cell exactly once, one FINISHED nested run each with its metrics, nothing left
    # RUNNING or WAITING, no run of another study, the password in no param or tag.
    summary = assert_study_consistent(s.path, secrets=(PASSWORD,))
    assert summary == {"complete": 6, "killed_runs": 0, "runs": 7}, summary

    client = MlflowClient()  # $MLFLOW_TRACKING_URI: the server
    runs = client.search_runs([s.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags[TAG_KIND] == "study")
    trials = [r for r in runs if r.data.tags[TAG_KIND] == "trial"]
    assert parent.data.tags["agelab.workers"] == str(WORKERS)
    pids = Counter(r.data.tags["agelab.worker_pid"] for r in trials)
    assert len(pids) >= 2, f"one worker ran every trial: {pids}"  # usually 3; imports race
    # Where the stores are is recorded, the password masked.
    assert parent.data.tags["optuna.storage"] == served.optuna.replace(PASSWORD, "***")

    # Artifacts went through the server's proxy into its --artifacts-destination (none on
    # this side), and come back through it.
    assert not list((s.path.parent / "mlruns").rglob("config.json"))
    for run in trials:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
        stored = list(server.artifacts.rglob(f"{run.info.run_id}/artifacts/config.json"))
        assert len(stored) == 1, f"config.json of {run.info.run_id} not under the server"
        for name in ("config.json", "diagnostics.json"):
            got = Path(client.download_artifacts(run.info.run_id, name, str(tmp_path)))
            text = got.read_text()
            json.loads(text)
            assert PASSWORD not in text

    # The report read the runs from the server and logged itself on the parent run there.
    report = s.path.parent / "mlruns" / "reports" / "served" / "report.md"
    assert "## " in report.read_text() and PASSWORD not in report.read_text()
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html"} <= logged, logged
    printed = s.run_out + s.report_out
    assert PASSWORD not in printed
    assert served.optuna.replace(PASSWORD, "***") in printed  # said where it ran, masked


def test_the_servers_rest_api_and_artifact_proxy_answer_over_http(
    served: Served, served_study: Study
) -> None:
    """What any HTTP client (or the UI's own scripts) gets from the server."""
    server, s = served.server, served_study
    assert server.get("/health").strip() == b"OK"
    assert b"<title>MLflow</title>" in server.get("/")
    found = server.api("runs/search", {"experiment_ids": [s.experiment_id], "max_results": 100})
    runs = found["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    results = [
        (r["info"]["status"], t["agelab.plan_key"])
        for r, t in zip(runs, tags, strict=True)
        if t[TAG_KIND] == "trial" and t.get(TAG_STATE, "COMPLETE") == "COMPLETE"
    ]
    planned = sorted(plan_key(p) for p in planned_trials(load_config(s.path)))
    assert sorted(key for _, key in results) == planned  # each cell once
    assert {status for status, _ in results} == {"FINISHED"}
    assert PASSWORD not in json.dumps(found)
    # The artifacts of one trial, listed and fetched as the UI fetches them.
    run_id = next(r["info"]["run_id"] for r, t in zip(runs, tags, strict=True)
                  if t[TAG_KIND] == "trial")  # fmt: skip
    listed = {f["path"] for f in server.api(f"artifacts/list?run_id={run_id}")["files"]}
    assert {"config.json", "diagnostics.json"} <= listed, listed
    config = json.loads(server.get(f"/get-artifact?path=config.json&run_uuid={run_id}"))
    assert config  # the trial's config, as the UI's artifact viewer shows it


@pytest.mark.browser
def test_the_servers_ui_shows_the_study_and_proxied_artifacts(
    chromium: WebDriver, served: Served, served_study: Study
) -> None:
    base, s = served.server.base, served_study
    client = MlflowClient()
    runs = client.search_runs([s.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags[TAG_KIND] == "study")
    trial = next(r for r in runs if r.data.tags[TAG_KIND] == "trial")
    chromium.get(runs_url(base, s.experiment_id))
    wait_until(chromium, lambda d: parent.info.run_name in page_text(d), "the parent run")
    chromium.get(f"{base}/#/experiments/{s.experiment_id}/runs/{trial.info.run_id}/artifacts")
    wait_until(
        chromium,
        lambda d: all(n in page_text(d) for n in ("config.json", "diagnostics.json")),
        "the trial's artifacts, listed through the server's proxy",
    )

"""The MLflow UI, as a person sees it: `agelab ui` over a real study, driven by headless Chromium.

Needs the Debian package ``chromium`` (``make sysdeps``); skips with the reason otherwise
(the driver is in ``tests/browser.py``). Screenshots go to ``test-artifacts/``;
with ``AGELAB_UPDATE_DOCS_SCREENSHOT=1`` the experiment page also goes to
``docs/img/mlflow_ui.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from agelab.config import validate
from agelab.study import run_study
from agelab.tracking import default_uri
from browser import Browser, free_port, kill_group
from conftest import REPO, tiny_study

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = REPO / "test-artifacts"
DOCS_SHOT = REPO / "docs" / "img" / "mlflow_ui.png"
SHARE_KEY = "agelab-test"
METRICS = ("mae", "coverage_at_mae", "calib_mae")


@pytest.fixture
def smoke_store(tmp_path: Path):
    """The smoke-sized study (4 trials, figures on) in a store under tmp_path."""
    root = tmp_path / "mlruns"
    cfg = validate(
        tiny_study(tmp_path, name="smoke", tracking={"root": str(root), "log_figures": True})
    )
    summary = run_study(cfg, quiet=True)
    assert summary.counts["COMPLETE"] == 4, summary.counts
    client = MlflowClient(default_uri(cfg.tracking))
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("agelab.run_kind") == "study")
    trials = [r for r in runs if r.data.tags.get("agelab.run_kind") == "trial"]
    assert len(trials) == 4
    # A view to open the page with: MLflow's own "share view" state (an experiment tag the
    # URL names), choosing the metric columns and a Run Name column wide enough to read.
    columns = [f"metrics.`{m}`" for m in METRICS]
    view = {
        "selectedColumns": columns,
        "columnOrder": ["attributes.`Run Name`", "runDateAndNestInfo", "duration", *columns],
        "columnWidths": {"attributes.`Run Name`": 330} | {c: 170 for c in columns},
    }
    client.set_experiment_tag(
        exp.experiment_id, f"mlflow.sharedViewState.{SHARE_KEY}", json.dumps(view)
    )
    return root, exp.experiment_id, parent, trials


@pytest.fixture
def mlflow_ui(smoke_store, tmp_path: Path):
    """`agelab ui` over the store, as a subprocess; always killed (with its workers)."""
    root = smoke_store[0]
    port = free_port()
    log = tmp_path / "ui.log"
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p
        ),
        # Two shared cores: one uvicorn worker and no background job runner are plenty.
        "MLFLOW_WORKERS": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    cmd = [sys.executable, "-m", "agelab.cli", "ui", "--root", str(root), "--port", str(port)]
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"agelab ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"agelab ui not healthy after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        kill_group(proc)


@pytest.fixture
def browser(chromium: str, tmp_path: Path, request: pytest.FixtureRequest):
    ARTIFACTS.mkdir(exist_ok=True)
    b = Browser(chromium, tmp_path / "chromium-profile", tmp_path / "chromium.log")
    failed_before = request.session.testsfailed
    try:
        yield b
    finally:
        if request.session.testsfailed > failed_before:
            with contextlib.suppress(Exception):  # what the page looked like when it failed
                b.screenshot(ARTIFACTS / "mlflow_ui_failure.png")
                (ARTIFACTS / "mlflow_ui_failure.txt").write_text(b.text())
        b.close()


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def shows_value(text: str, value: float) -> bool:
    """Whether ``value`` is among the numbers written in ``text`` (as the UI formats it)."""
    return any(
        math.isclose(float(n), value, rel_tol=1e-6, abs_tol=1e-9) for n in NUMBER.findall(text)
    )


def close_assistant(b: Browser) -> None:
    # MLflow 3 opens an "Assistant" side panel by default; a person would close it.
    b.click("document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')")


def test_experiment_page_shows_nested_trials_and_metrics(
    chromium: str, smoke_store, mlflow_ui: str, browser: Browser
) -> None:
    # (chromium first: no Chromium skips before the study is run)
    _root, exp_id, parent, trials = smoke_store
    parent_name = parent.info.run_name
    names = sorted(r.info.run_name for r in trials)
    assert all(re.fullmatch(r"resnet10t · \w+ · \w+ · seed 0", n) for n in names), names

    # The "Model training" side of the UI (MLflow 3 opens on GenAI); the choice is remembered.
    browser.goto(mlflow_ui + "/#/")
    browser.wait_for("document.body && document.body.innerText.includes('Model training')")
    browser.click_text("Model training", "button, label, [role=radio], span")

    browser.goto(f"{mlflow_ui}/#/experiments/{exp_id}/runs?viewStateShareKey={SHARE_KEY}")
    browser.wait_for(
        f"document.body && document.body.innerText.includes({json.dumps(parent_name)})",
        what=f"the parent run {parent_name!r}",
    )
    browser.click_text("Override saved view")  # keep the shared columns; drops the banner
    close_assistant(browser)
    # MLflow lists trial runs collapsed under their parent: expand it as a person would,
    # with the [+] button in its Run Name cell.
    if not all(n in browser.text() for n in names):
        expand = (
            f"document.querySelector('a[href$=\"/runs/{parent.info.run_id}\"]')"
            "?.closest('[col-id]')?.querySelector('button')"
        )
        assert browser.click(expand), "no expand button beside the parent run"
    browser.wait_for(
        f"{json.dumps(names)}.every(n => document.body.innerText.includes(n))",
        what=f"the nested trial runs {names}",
    )
    # Let the "saved view overridden" toast fade before the picture.
    with contextlib.suppress(TimeoutError):
        browser.wait_for(
            "!document.body.innerText.includes('saved view was overridden')", timeout=15
        )
    shot = browser.screenshot(ARTIFACTS / "mlflow_ui_experiment.png")

    header = browser.js("document.querySelector('.ag-header')?.innerText || ''")
    for metric in METRICS:
        assert re.search(rf"(?m)^{metric}$", header), f"no {metric} column in {header!r}"
    # One grid row (pinned name part + scrolling part) per run, in order on screen.
    rows: list[str] = browser.js(
        """(() => { const rows = {};
             for (const r of document.querySelectorAll('.ag-row')) {
               const i = Number(r.getAttribute('row-index'));
               rows[i] = (rows[i] || '') + '\\n' + r.innerText; }
             return Object.keys(rows).sort((a, b) => a - b).map(k => rows[k]); })()"""
    )
    assert len(rows) == 5, rows
    assert parent_name in rows[0], "the parent run is the first row, above its trials"
    for run in trials:
        row = next((r for r in rows if run.info.run_name in r), None)
        assert row is not None, run.info.run_name
        for metric in METRICS:
            value = run.data.metrics[metric]
            assert shows_value(row, value), f"{run.info.run_name}: {metric}={value} not in {row!r}"

    assert shot.stat().st_size < 400_000
    if os.environ.get("AGELAB_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SHOT)

    # A trial's own page: its name, its parent, and its metrics with their values.
    run = min(trials, key=lambda r: r.info.run_name)
    browser.goto(f"{mlflow_ui}/#/experiments/{exp_id}/runs/{run.info.run_id}")
    browser.wait_for(
        "document.body && document.body.innerText.includes('coverage_at_mae')",
        what="the trial's metrics",
    )
    close_assistant(browser)
    # 85 metrics: type "mae" in the metrics search box, as a person looking for it would.
    box = "document.querySelector('input[placeholder=\"Search metrics\"]')"
    assert browser.js(f"(() => {{ const e = {box}; e?.focus(); return !!e; }})()"), (
        "no metrics search box on the run page"
    )
    browser.send("Input.insertText", {"text": "mae"})
    browser.wait_for(
        "!document.body.innerText.includes('epoch_seconds')", timeout=15, what="filtered metrics"
    )
    browser.screenshot(ARTIFACTS / "mlflow_ui_trial_run.png")
    lines = [line.strip() for line in browser.text().splitlines()]
    assert run.info.run_name in lines
    assert parent_name in lines, "the trial page links its parent run"
    for metric in ("mae", "coverage_at_mae"):
        at = [i for i, line in enumerate(lines) if line == metric]
        assert at, f"no {metric} on the trial page"
        value = run.data.metrics[metric]
        assert any(shows_value(lines[i + 1], value) for i in at if i + 1 < len(lines)), (
            f"{metric}={value} not shown beside its name"
        )

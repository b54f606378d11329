"""The MLflow UI, as a person sees it: `agelab ui` over a real study, driven by headless Chromium.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``make sysdeps``); skips with
the reason otherwise. Selenium drives the browser (the ``chromium`` fixture in ``conftest.py``,
``tests/helpers/browser.py``); mirakuru runs `agelab ui`. Screenshots go to ``test-artifacts/``;
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
import sys
from collections.abc import Callable
from pathlib import Path

import port_for
import pytest
from mirakuru import HTTPExecutor
from mirakuru.exceptions import ExecutorError
from mlflow.tracking import MlflowClient
from selenium.common.exceptions import ElementClickInterceptedException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from agelab.config import validate
from agelab.study import run_study
from agelab.tracking import default_uri
from helpers import REPO
from helpers.browser import page_text, wait_until
from helpers.studies import tiny_study

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
    """`agelab ui` over the store on a free loopback port; always stopped (with its workers)."""
    root = smoke_store[0]
    port = port_for.select_random()
    log = tmp_path / "ui.log"
    env = {
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p
        ),
        # Two shared cores: one uvicorn worker and no background job runner are plenty.
        "MLFLOW_WORKERS": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    cmd = [sys.executable, "-m", "agelab.cli", "ui", "--root", str(root), "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as fh:
        server = HTTPExecutor(
            cmd,
            url=base + "/health",
            method="GET",
            timeout=120,
            envvars=env,
            stdout=fh,
            stderr=fh,
        )
        try:
            server.start()  # returns once /health answers 2xx
        except ExecutorError as exc:
            server.kill()
            pytest.fail(f"agelab ui did not come up ({exc}):\n{log.read_text()[-3000:]}")
        try:
            yield base
        finally:
            server.kill()  # the process group and every child it started


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def shows_value(text: str, value: float) -> bool:
    """Whether ``value`` is among the numbers written in ``text`` (as the UI formats it)."""
    return any(
        math.isclose(float(n), value, rel_tol=1e-6, abs_tol=1e-9) for n in NUMBER.findall(text)
    )


def shows(text: str) -> Callable[[WebDriver], bool]:
    return lambda d: text in page_text(d)


def click_if_there(within: WebDriver | WebElement, by: str, selector: str) -> bool:
    """Click the first shown element found, once no toast covers it; False when none."""
    shown = [e for e in within.find_elements(by, selector) if e.is_displayed()]
    if shown:
        WebDriverWait(within, 15, ignored_exceptions=(ElementClickInterceptedException,)).until(
            lambda _: shown[0].click() or True
        )
    return bool(shown)


def close_assistant(driver: WebDriver) -> None:
    # MLflow 3 opens an "Assistant" side panel by default; a person would close it.
    click_if_there(
        driver, By.CSS_SELECTOR, '[data-component-id="mlflow.assistant.chat_panel.close"]'
    )


def with_text(text: str, kind: str = "self::button") -> str:
    """XPath: elements of ``kind`` (an XPath test) whose whole text is ``text``."""
    return f"//*[{kind}][normalize-space(.)={json.dumps(text)}]"


def test_experiment_page_shows_nested_trials_and_metrics(
    chromium: WebDriver, smoke_store, mlflow_ui: str
) -> None:
    # (chromium first: no Chromium skips before the study is run)
    browser = chromium
    _root, exp_id, parent, trials = smoke_store
    parent_name = parent.info.run_name
    names = sorted(r.info.run_name for r in trials)
    assert all(re.fullmatch(r"resnet10t · \w+ · \w+ · seed 0", n) for n in names), names

    # The "Model training" side of the UI (MLflow 3 opens on GenAI); the choice is remembered.
    browser.get(mlflow_ui + "/#/")
    wait_until(browser, shows("Model training"), "the 'Model training' switch")
    assert click_if_there(
        browser,
        By.XPATH,
        with_text("Model training", "self::button or self::label or self::span or @role='radio'"),
    ), "no 'Model training' switch"

    browser.get(f"{mlflow_ui}/#/experiments/{exp_id}/runs?viewStateShareKey={SHARE_KEY}")
    wait_until(browser, shows(parent_name), f"the parent run {parent_name!r}")
    # Keep the shared columns; drops the banner.
    click_if_there(browser, By.XPATH, with_text("Override saved view"))
    close_assistant(browser)
    # MLflow lists trial runs collapsed under their parent: expand it as a person would,
    # with the [+] button in its Run Name cell.
    if not all(n in page_text(browser) for n in names):
        cell = browser.find_element(
            By.CSS_SELECTOR, f'a[href$="/runs/{parent.info.run_id}"]'
        ).find_element(By.XPATH, "./ancestor::*[@col-id][1]")
        assert click_if_there(cell, By.TAG_NAME, "button"), "no expand button beside the parent"
    wait_until(
        browser,
        lambda d: all(n in page_text(d) for n in names),
        f"the nested trial runs {names}",
    )
    # Let the "saved view overridden" toast fade before the picture.
    with contextlib.suppress(TimeoutException):
        wait_until(
            browser,
            lambda d: "saved view was overridden" not in page_text(d),
            "the toast gone",
            timeout=15,
        )
    shot = ARTIFACTS / "mlflow_ui_experiment.png"
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(shot))

    header = browser.find_element(By.CSS_SELECTOR, ".ag-header").text
    for metric in METRICS:
        assert re.search(rf"(?m)^{metric}$", header), f"no {metric} column in {header!r}"
    # One grid row (pinned name part + scrolling part) per run, in order on screen.
    parts: dict[int, str] = {}
    for row in browser.find_elements(By.CSS_SELECTOR, ".ag-row"):
        index = int(row.get_attribute("row-index"))
        parts[index] = parts.get(index, "") + "\n" + row.text
    rows = [parts[i] for i in sorted(parts)]
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
    browser.get(f"{mlflow_ui}/#/experiments/{exp_id}/runs/{run.info.run_id}")
    wait_until(browser, shows("coverage_at_mae"), "the trial's metrics")
    close_assistant(browser)
    # 85 metrics: type "mae" in the metrics search box, as a person looking for it would.
    boxes = browser.find_elements(By.CSS_SELECTOR, 'input[placeholder="Search metrics"]')
    assert boxes, "no metrics search box on the run page"
    boxes[0].send_keys("mae")
    wait_until(
        browser, lambda d: "epoch_seconds" not in page_text(d), "filtered metrics", timeout=15
    )
    browser.save_screenshot(str(ARTIFACTS / "mlflow_ui_trial_run.png"))
    lines = [line.strip() for line in page_text(browser).splitlines()]
    assert run.info.run_name in lines
    assert parent_name in lines, "the trial page links its parent run"
    for metric in ("mae", "coverage_at_mae"):
        at = [i for i, line in enumerate(lines) if line == metric]
        assert at, f"no {metric} on the trial page"
        value = run.data.metrics[metric]
        assert any(shows_value(lines[i + 1], value) for i in at if i + 1 < len(lines)), (
            f"{metric}={value} not shown beside its name"
        )

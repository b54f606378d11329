"""The MLflow UI, as a person sees it: `agelab ui` over a real study, driven by headless Chromium;
and what agelab records for that UI (datasets, descriptions, the verdict, the kind).

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``make sysdeps``); the
browser tests skip with the reason otherwise. Selenium drives the browser (the ``chromium``
fixture in ``conftest.py``, ``tests/helpers/browser.py``); mirakuru runs `agelab ui`.
Screenshots go to ``test-artifacts/``; with ``AGELAB_UPDATE_DOCS_SCREENSHOT=1`` they also go
to ``docs/img/`` (``mlflow_ui.png``, and cropped and quantised ``mlflow_runs_verdict.png``,
``mlflow_run_datasets.png``, ``mlflow_models.png``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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

from agelab import cli
from agelab.config import DataConfig, validate
from agelab.reporting import report_for_config, verdict_note
from agelab.study import run_study
from agelab.tracking import default_uri
from agelab.tracking.datasets import data_source, dataset_inputs, split_datasets, whole_dataset
from agelab.ui import browser_host, runs_url, study_links
from helpers import REPO
from helpers.browser import missing, page_text, wait_until
from helpers.studies import tiny_study

ARTIFACTS = REPO / "test-artifacts"
DOCS_SHOT = REPO / "docs" / "img" / "mlflow_ui.png"
SHARE_KEY = "agelab-test"
METRICS = ("mae", "coverage_at_mae", "calib_mae")


DESCRIPTION = "Does dropping BatchNorm, or using tanh, change the MAE? A smoke-sized grid."


@dataclass
class Study:
    """The smoke study as the tests find it in its store."""

    root: Path
    name: str
    experiment_id: str
    parent: object  # mlflow Run
    trials: list  # mlflow Runs
    verdict: list[str]
    registered: str | None  # the registered model's name (None: `agelab register` absent)
    client: MlflowClient


def has_register() -> bool:
    """Whether this agelab has `agelab register` (the Model Registry half of issue 17)."""
    return hasattr(cli, "cmd_register")


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """The smoke-sized study (4 trials, figures on) as `agelab run` leaves it, in a store of
    its own: runs finished, the report written (verdict on the notes), datasets logged; and,
    when this agelab has `agelab register`, its best model registered."""
    tmp = tmp_path_factory.mktemp("ui-study")
    root = tmp / "mlruns"
    raw = tiny_study(
        tmp,
        name="smoke",
        description=DESCRIPTION,
        tracking={"root": str(root), "log_figures": True, "log_model": "best"},
        # The session's cache (conftest's is per test, and this study is per module).
        data={"cache_dir": str(tmp_path_factory.getbasetemp() / "agelab-cache")},
    )
    summary = run_study(validate(raw), quiet=True)
    assert summary.counts["COMPLETE"] == 4, summary.counts
    report = report_for_config(summary.config)
    registered = None
    if has_register():
        assert cli.main(["register", "smoke", "--root", str(root)]) == 0
        registered = "smoke"
    client = MlflowClient(default_uri(summary.config.tracking))
    exp = client.get_experiment_by_name("smoke")
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
    return Study(
        root, "smoke", exp.experiment_id, parent, trials, report.analysis.verdict, registered,
        client,
    )  # fmt: skip


@dataclass
class Server:
    base: str  # http://127.0.0.1:PORT
    log: Path  # what `agelab ui` printed (and the server after it)
    pid: int  # the `agelab ui` process


@pytest.fixture(scope="module")
def mlflow_ui(smoke_store: Study, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`agelab ui` over the store on a free loopback port, as `make ui` runs it; always
    stopped (with its workers). Skips first when there is no Chromium to look at it."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    port = port_for.select_random()
    log = tmp_path_factory.mktemp("ui-server") / "ui.log"
    env = {
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p
        ),
        # Two shared cores: one uvicorn worker and no background job runner are plenty.
        "MLFLOW_WORKERS": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    root = smoke_store.root
    cmd = [sys.executable, "-m", "agelab.cli", "ui", "--root", str(root), "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as fh:
        server = HTTPExecutor(
            cmd, url=base + "/health", method="GET", timeout=120, envvars=env, stdout=fh,
            stderr=fh,
        )  # fmt: skip
        try:
            server.start()  # returns once /health answers 2xx
        except ExecutorError as exc:
            server.kill()
            pytest.fail(f"agelab ui did not come up ({exc}):\n{log.read_text()[-3000:]}")
        try:
            yield Server(base, log, server.process.pid)
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


@pytest.mark.browser
@pytest.mark.slow
def test_experiment_page_shows_nested_trials_and_metrics(
    chromium: WebDriver, smoke_store: Study, mlflow_ui: Server
) -> None:
    browser = chromium
    exp_id, parent, trials = smoke_store.experiment_id, smoke_store.parent, smoke_store.trials
    base = mlflow_ui.base
    parent_name = parent.info.run_name
    names = sorted(r.info.run_name for r in trials)
    assert all(re.fullmatch(r"resnet10t · \w+ · \w+ · seed 0", n) for n in names), names

    # The "Model training" side of the UI (MLflow 3 opens on GenAI); the choice is remembered.
    browser.get(base + "/#/")
    wait_until(browser, shows("Model training"), "the 'Model training' switch")
    assert click_if_there(
        browser,
        By.XPATH,
        with_text("Model training", "self::button or self::label or self::span or @role='radio'"),
    ), "no 'Model training' switch"

    browser.get(f"{base}/#/experiments/{exp_id}/runs?viewStateShareKey={SHARE_KEY}")
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
    browser.get(f"{base}/#/experiments/{exp_id}/runs/{run.info.run_id}")
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


# ---------------------------------------------------------------- what agelab records for the UI

DOCS_IMG = REPO / "docs" / "img"
FAST_CONTEXTS = ("train", "calib", "conformal", "test")


@dataclass
class FakeData:
    """What split_datasets reads of a FaceDataset, without images."""

    ages: np.ndarray
    subjects: np.ndarray
    split: np.ndarray
    paths: np.ndarray | None
    fingerprint: str


def fake_data(split: list[str], paths: bool = False) -> FakeData:
    n = len(split)
    return FakeData(
        ages=np.arange(n, dtype=np.float32) * 10 + 5,  # 5, 15, 25, …
        subjects=np.array([f"s{i // 2}" for i in range(n)]),
        split=np.array(split),
        paths=np.array([f"/data/faces/{i}.jpg" for i in range(n)]) if paths else None,
        fingerprint="0123456789abcdef" * 4,
    )


def test_a_trial_logs_each_split_with_its_members_and_ages() -> None:
    data = fake_data(["train", "train", "test", "calib", "train", "test"], paths=True)
    records = split_datasets("demo", "~/faces", data)
    # conformal is empty here: no dataset for it, the others in the order of a trial
    assert [r.context for r in records] == ["train", "calib", "test"]
    assert [r.name for r in records] == ["demo-train", "demo-calib", "demo-test"]
    train, calib, test = records
    assert train.table["index"].tolist() == [0, 1, 4]
    assert train.table.columns.tolist() == ["index", "age", "subject", "path"]
    assert train.profile == {
        "num_rows": 3, "num_subjects": 2, "age_min": 5.0, "age_median": 15.0,
        "age_mean": 21.667, "age_max": 45.0, "age_std": 16.997, "fingerprint": data.fingerprint,
    }  # fmt: skip
    assert calib.profile["num_rows"] == 1 and test.profile["age_max"] == 55.0
    assert re.fullmatch(r"0123456789ab-train-[0-9a-f]{8}", train.digest)
    assert all(len(r.digest) <= 36 for r in records)  # MLflow's limit
    # Another split of the same data (a replicate that varies it) is another dataset...
    moved = fake_data(["train", "test", "train", "calib", "train", "test"], paths=True)
    assert split_datasets("demo", "~/faces", moved)[0].digest != train.digest
    # ...and the same split is the same one.
    assert split_datasets("demo", "~/faces", data)[0].digest == train.digest
    whole = whole_dataset("demo", "synthetic:3", data)
    assert (whole.name, whole.context, whole.digest) == ("demo", "all", "0123456789ab")
    assert whole.profile["num_rows"] == 6 and whole.profile["num_subjects"] == 3


def test_dataset_inputs_carry_name_digest_source_profile_and_context(monkeypatch) -> None:
    monkeypatch.setenv("HOME", "/home/ana")
    records = split_datasets("demo", "/home/ana/faces", fake_data(["train", "conformal"]))
    inputs = dataset_inputs(records)
    assert [i.tags[0].key for i in inputs] == ["mlflow.data.context"] * 2
    assert [i.tags[0].value for i in inputs] == ["train", "conformal"]
    first = inputs[0].dataset
    assert (first.name, first.digest) == ("demo-train", records[0].digest)
    assert first.source_type == "local"
    assert json.loads(first.source) == {"uri": "~/faces"}  # the home folder not recorded
    assert json.loads(first.profile)["num_rows"] == 1
    assert [c["name"] for c in json.loads(first.schema)["mlflow_colspec"]] == [
        "index", "age", "subject",
    ]  # fmt: skip


def test_the_source_is_the_seed_or_the_path_without_home(tmp_path: Path, monkeypatch) -> None:
    assert data_source(DataConfig()) == "synthetic:0"
    assert data_source(DataConfig(synthetic={"seed": 7})) == "synthetic:7"
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "faces").mkdir()
    assert data_source(DataConfig(source="utkface", path=tmp_path / "faces")) == "~/faces"


def test_the_verdict_follows_the_description() -> None:
    note = verdict_note("What helps?\n", ["A helps.", "B does not."])
    assert note.startswith("What helps?\n\n**Verdict**")
    assert note.endswith("\n\n- A helps.\n- B does not.")
    assert verdict_note("", ["A helps."]).startswith("**Verdict**")


def test_telemetry_is_off_unless_the_user_opted_in(tmp_path: Path, monkeypatch) -> None:
    # Any command: this one stops at once (no store to show).
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    assert cli.main(["ui", "--root", str(tmp_path / "none")]) == 2
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # the user opts in
    assert cli.main(["ui", "--root", str(tmp_path / "none")]) == 2
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_ui_links_are_what_a_browser_on_this_machine_opens() -> None:
    assert browser_host("127.0.0.1") == "127.0.0.1"
    assert browser_host("0.0.0.0") == "127.0.0.1"
    assert browser_host("::1") == "[::1]"
    assert (
        runs_url("http://h:5", "7")
        == "http://h:5/#/experiments/7/runs?workflowType=machine_learning"
    )


@pytest.mark.slow
def test_the_store_holds_the_study_description_verdict_and_datasets(smoke_store: Study) -> None:
    s, client = smoke_store, smoke_store.client
    note = verdict_note(DESCRIPTION, s.verdict)
    assert len(s.verdict) >= 3
    # The experiment: a model-training one, its description the study's, then the verdict.
    exp = client.get_experiment(s.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.tags["mlflow.note.content"] == note
    # The parent run: the same note; the description also on its own (the report's header).
    tags = s.parent.data.tags
    assert tags["mlflow.note.content"] == note
    assert tags["agelab.description"] == DESCRIPTION
    report_md = (s.root / "reports" / "smoke" / "report.md").read_text()
    assert DESCRIPTION in report_md
    again = report_for_config(validate(tiny_study(s.root.parent, name="smoke")), log=False)
    assert again.analysis.verdict == s.verdict
    assert "**Verdict**" not in again.markdown.read_text(), "the note leaked into the header"
    # A later invocation of the study keeps the verdict until its own report replaces it.
    from agelab.config import TrackingConfig
    from agelab.tracking import Tracker

    Tracker(TrackingConfig(root=s.root), "smoke").describe_experiment(DESCRIPTION)
    assert client.get_experiment(s.experiment_id).tags["mlflow.note.content"] == note

    fp = tags["agelab.dataset_fingerprint"]
    (whole,) = s.parent.inputs.dataset_inputs
    assert (whole.dataset.name, whole.dataset.digest) == ("smoke", fp[:12])
    assert json.loads(whole.dataset.source) == {"uri": "synthetic:0"}
    assert json.loads(whole.dataset.profile)["num_rows"] == 160
    assert [(t.key, t.value) for t in whole.tags] == [("mlflow.data.context", "all")]
    for run in s.trials:
        inputs = run.inputs.dataset_inputs
        contexts = [i.tags[0].value for i in inputs]
        assert sorted(contexts) == sorted(FAST_CONTEXTS), run.info.run_name
        for i, context in zip(inputs, contexts, strict=True):
            assert i.dataset.name == f"smoke-{context}"
            assert i.dataset.digest.startswith(f"{fp[:12]}-{context}-")
            profile = json.loads(i.dataset.profile)
            assert profile["num_rows"] == run.data.metrics[f"n_{context}_split"]
            assert profile["fingerprint"] == fp
            assert profile["age_min"] <= profile["age_median"] <= profile["age_max"]
    # One seed: every trial trained on the same split, so they name the same datasets.
    digests = {tuple(sorted(i.dataset.digest for i in r.inputs.dataset_inputs)) for r in s.trials}
    assert len(digests) == 1
    # What `agelab ui` prints before serving: the study's runs table.
    uri = default_uri(validate(tiny_study(s.root.parent, name="smoke")).tracking)
    assert study_links(uri, "http://127.0.0.1:5000") == [
        f"  smoke  http://127.0.0.1:5000/#/experiments/{s.experiment_id}/runs"
        "?workflowType=machine_learning"
    ]


# ------------------------------------------------------------------- a person in the browser


def save_shot(driver: WebDriver, name: str, crop: tuple[int, int, int, int] | None = None) -> Path:
    """The page to ``test-artifacts/<name>.png``; with ``AGELAB_UPDATE_DOCS_SCREENSHOT=1``
    also to ``docs/img/<name>.png``, cropped to ``crop`` and quantised to a small palette."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(shot))
    if os.environ.get("AGELAB_UPDATE_DOCS_SCREENSHOT") == "1":
        from PIL import Image

        doc = DOCS_IMG / f"{name}.png"
        with Image.open(shot) as image:
            image = image.convert("RGB")
            if crop:
                image = image.crop(crop)
            small = image.quantize(colors=64, method=Image.Quantize.MEDIANCUT)
            small.save(doc, optimize=True)
        assert doc.stat().st_size < 300_000, f"{doc}: {doc.stat().st_size} bytes"
    return shot


def children_of(pid: int) -> list[int]:
    """Every live process whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if entry.name.isdigit() and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def shown(driver: WebDriver, xpath: str) -> list[WebElement]:
    return [e for e in driver.find_elements(By.XPATH, xpath) if e.is_displayed()]


CLOSE_DIALOG = "//*[@role='dialog']//button[@aria-label='Close']"


def innermost(text: str) -> str:
    """XPath: the deepest elements whose whole text is ``text``."""
    t = json.dumps(text)
    return f"//*[normalize-space(.)={t}][not(.//*[normalize-space(.)={t}])]"


def run_link(run_id: str) -> str:
    """CSS: the links to a run's page (its name in the runs table)."""
    return f'a[href*="/runs/{run_id}"]'


def expand_parent(browser: WebDriver, parent_id: str) -> None:
    """MLflow lists trial runs collapsed under their parent: the [+] in its Run Name cell."""
    cell = browser.find_element(By.CSS_SELECTOR, run_link(parent_id)).find_element(
        By.XPATH, "./ancestor::*[@col-id][1]"
    )
    assert click_if_there(cell, By.TAG_NAME, "button"), "no expand button beside the parent"


def normalized(text: str) -> str:
    return " ".join(text.split())


def shows_words(text: str) -> Callable[[WebDriver], bool]:
    """``text`` on the page, however the page wraps it."""
    return lambda d: normalized(text) in normalized(page_text(d))


@pytest.mark.browser
@pytest.mark.slow
def test_a_person_finds_the_verdict_the_runs_the_datasets_and_the_model(
    chromium: WebDriver, smoke_store: Study, mlflow_ui: Server
) -> None:
    browser, s = chromium, smoke_store
    parent_name = s.parent.info.run_name
    trial = min(s.trials, key=lambda r: r.info.run_name)
    digests = {i.tags[0].value: i.dataset.digest for i in trial.inputs.dataset_inputs}

    # `agelab ui` said where the study's runs table is, and sends MLflow no telemetry.
    printed = runs_url(mlflow_ui.base, s.experiment_id)
    assert f"  smoke  {printed}\n" in mlflow_ui.log.read_text()
    servers = children_of(mlflow_ui.pid)
    assert servers, "agelab ui runs no mlflow server"
    assert all(environment_of(p).get("MLFLOW_DISABLE_TELEMETRY") == "true" for p in servers)

    # The root, as `make ui` opens it: "Model training" (MLflow 3 starts on GenAI), the study.
    browser.get(mlflow_ui.base + "/")
    switch = with_text("Model training", "@role='button'")
    wait_until(browser, lambda d: shown(d, switch), "the 'Model training' switch")
    assert click_if_there(browser, By.XPATH, switch)
    wait_until(browser, lambda d: shown(d, with_text("smoke", "self::a")), "the study's link")
    assert click_if_there(browser, By.XPATH, with_text("smoke", "self::a"))
    wait_until(browser, lambda d: d.current_url.startswith(printed), f"{printed} (the URL)")
    wait_until(browser, shows(parent_name), f"the parent run {parent_name!r}")
    close_assistant(browser)
    # The description above the runs table; expanded, the verdict under it.
    wait_until(browser, shows(DESCRIPTION), "the study's description")
    assert click_if_there(
        browser,
        By.CSS_SELECTOR,
        '[data-component-id="mlflow.experiment.metadata_editor.expand_button"]',
    ), "no button to expand the experiment's description"
    for sentence in s.verdict:
        wait_until(browser, shows_words(sentence), sentence)
    expand_parent(browser, s.parent.info.run_id)
    names = [r.info.run_name for r in s.trials]
    wait_until(browser, lambda d: all(n in page_text(d) for n in names), f"the trials {names}")
    # The Dataset column: the whole data on the parent, the train split first on each trial.
    fp12 = s.parent.data.tags["agelab.dataset_fingerprint"][:12]
    assert f"smoke ({fp12})" in page_text(browser)
    assert f"smoke-train ({digests['train']})" in page_text(browser)
    save_shot(browser, "mlflow_runs_verdict")

    # The parent run's own page: its description is the study's, then the verdict.
    assert click_if_there(browser, By.CSS_SELECTOR, run_link(s.parent.info.run_id))
    wait_until(browser, shows("About this run"), "the parent run's page")
    text = normalized(page_text(browser))
    assert normalized(DESCRIPTION) in text and normalized(s.verdict[0]) in text

    # A trial's page: its four datasets, each with its size and ages.
    browser.get(printed)
    wait_until(browser, shows(parent_name), "the runs table again")
    close_assistant(browser)
    if trial.info.run_name not in page_text(browser):
        expand_parent(browser, s.parent.info.run_id)
    wait_until(browser, shows(trial.info.run_name), trial.info.run_name)
    assert click_if_there(browser, By.CSS_SELECTOR, run_link(trial.info.run_id))
    train = f"smoke-train ({digests['train']})"
    wait_until(browser, lambda d: shown(d, with_text(train, "self::span")), "the train dataset")
    close_assistant(browser)
    assert click_if_there(browser, By.XPATH, with_text(train, "self::span"))
    wait_until(browser, shows("Data details for"), "the datasets drawer")
    for context in FAST_CONTEXTS:
        label = f"smoke-{context} ({digests[context]})"
        drawer_items = shown(browser, innermost(label))
        assert drawer_items, f"no {label} in the drawer"
        drawer_items[-1].click()  # the drawer comes after the page beneath it
        rows = int(trial.data.metrics[f"n_{context}_split"])
        wait_until(browser, shows(f"num rows: {rows}"), f"{context}: {rows} rows")
        text = page_text(browser)
        assert "synthetic:0" in text and digests[context] in text and "age median:" in text
        if context == "train":
            save_shot(browser, "mlflow_run_datasets", crop=(800, 0, 1600, 540))  # the drawer

    if s.registered is None:
        return  # no `agelab register` in this agelab: no Models page to look at
    browser.get(mlflow_ui.base + "/")
    registry = with_text("Model registry", "self::a")
    wait_until(browser, lambda d: shown(d, registry), "the Model registry link")
    assert click_if_there(browser, By.XPATH, registry)
    wait_until(browser, lambda d: shown(d, with_text(s.registered, "self::a")), "the model")
    # MLflow announces its new registry page in a dialog first: closed, as a person would.
    with contextlib.suppress(TimeoutException):
        wait_until(browser, lambda d: shown(d, CLOSE_DIALOG), "the dialog", timeout=5)
    click_if_there(browser, By.XPATH, CLOSE_DIALOG)
    assert click_if_there(browser, By.XPATH, with_text(s.registered, "self::a"))
    wait_until(browser, shows("Version 1"), "its version 1")
    wait_until(browser, shows("champion"), "its alias")
    save_shot(browser, "mlflow_models")

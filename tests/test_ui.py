"""The MLflow UI, as a person sees it: `agelab ui` over a real study, driven by headless Chromium.

Needs the Debian package ``chromium`` (``make sysdeps``); skips with the reason otherwise.
Chromium is driven over the DevTools protocol on ``--remote-debugging-pipe`` (NUL-separated
JSON on fds 3 and 4), so no Python dependency is needed. Screenshots go to ``test-artifacts/``;
with ``AGELAB_UPDATE_DOCS_SCREENSHOT=1`` the experiment page also goes to
``docs/img/mlflow_ui.png``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from agelab.config import validate
from agelab.study import run_study
from agelab.tracking import default_uri
from conftest import REPO, tiny_study

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = REPO / "test-artifacts"
DOCS_SHOT = REPO / "docs" / "img" / "mlflow_ui.png"
SHARE_KEY = "agelab-test"
METRICS = ("mae", "coverage_at_mae", "calib_mae")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a process started with ``start_new_session=True`` and all its children."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children (uvicorn workers) may outlive the leader for a moment: take the group down.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (stdlib only)."""

    def __init__(self, exe: str, profile: Path, log: Path, size: tuple[int, int] = (1600, 1000)):
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        # Chromium reads commands from fd 3 and writes replies to fd 4; hand it our pipe ends
        # there (moved above 10 first, so the redirections cannot clash).
        child_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
        child_w = fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r)
        os.close(res_w)
        args = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        redirect = f"3<&{child_r} 4>&{child_w} {child_r}<&- {child_w}>&-"
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$@" {redirect}', "chromium", *args],
                pass_fds=(child_r, child_w),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        os.close(child_r)
        os.close(child_w)
        self._out, self._in = cmd_w, res_r
        self._buf = b""
        self._id = 0
        self.session: str | None = None
        try:
            targets = self.send("Target.getTargets", browser=True)["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            self.session = self.send(
                "Target.attachToTarget",
                {"targetId": page["targetId"], "flatten": True},
                browser=True,
            )["sessionId"]
        except BaseException:
            self.close()
            raise

    def send(
        self, method: str, params: dict | None = None, timeout: float = 30, browser: bool = False
    ) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not browser:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:  # replies and events interleave; keep ours, drop the events
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._in], [], [], left)[0]:
                    raise TimeoutError(f"Chromium did not answer {method} within {timeout}s")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe (crashed?)")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def wait_for(self, expression: str, timeout: float = 60, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # the page may be navigating
                value = self.js(expression)
                if value:
                    return value
            time.sleep(0.3)
        raise TimeoutError(f"page never showed {what or expression} within {timeout}s")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def click(self, element_js: str) -> bool:
        """Click the element an expression finds; False when there is none."""
        return bool(
            self.js(f"(() => {{ const e = {element_js}; if (e) e.click(); return !!e; }})()")
        )

    def click_text(self, text: str, selector: str = "button") -> bool:
        return self.click(
            f"[...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => e.innerText && e.innerText.trim() === {json.dumps(text)})"
        )

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"}, timeout=60)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", browser=True, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        kill_group(self.proc, timeout=5)
        for fd in (self._out, self._in):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def chromium() -> str:
    exe = find_chromium()
    if exe is None:
        pytest.skip(
            "Chromium not found (chromium on PATH or /usr/bin/chromium): install the Debian "
            "package `chromium` (`make sysdeps` does it as root)"
        )
    return exe


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

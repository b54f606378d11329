"""Signals and servers, with real processes and real signals.

Ctrl-C is sent as a terminal sends it, SIGINT to the whole process group of a real `agelab`
process, in each phase of a run: synthetic-face generation, image decoding, training and the
report. Each must end within ``STOP_S`` seconds (about 2 s on an idle machine; generous for
the 2-core CI), exit with code 130 and one line, leave no half-written cache entry or report
file, and the same command must then complete.

`agelab ui` and `agelab dashboard` refuse a busy port and a missing store with one line, and
a SIGTERM to `agelab ui` (or its SIGKILL) leaves none of the processes MLflow started.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from agelab.cli import main
from agelab.config import validate
from agelab.study import open_storage, run_study
from agelab.tracking import TAG_KIND
from helpers import REPO
from helpers.studies import tiny_study

STOP_S = 5.0
AGELAB = [sys.executable, "-m", "agelab.cli"]


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    # Two threads for rendering and decoding: the phases last as long on any machine.
    return os.environ | {
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "2",
        "AGELAB_DECODE_THREADS": "2",
        **extra,
    }


class Agelab:
    """A running `agelab` command in a session of its own, its output read by a thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*AGELAB, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # As in a terminal: a runner that started pytest in the background (bash gives
            # background jobs SIGINT ignored, and children inherit that) must not make the
            # CLI deaf to the Ctrl-C these tests send.
            preexec_fn=_sigint_default,
            env=env or _env(),
        )
        self._out = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self._out += chunk

    @property
    def output(self) -> str:
        return bytes(self._out).decode(errors="replace")

    def wait_for(self, ready: Callable[[str], bool], what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not ready(self.output):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"never saw {what} (exit {self.proc.poll()}):\n{self.output[-3000:]}")
            time.sleep(0.02)

    def ctrl_c(self) -> tuple[int, float]:
        """SIGINT to the whole group, as a terminal sends it; (exit code, seconds to exit)."""
        t0 = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 120 s after Ctrl-C:\n{self.output[-3000:]}")
        seconds = time.monotonic() - t0
        self._reader.join(timeout=10)
        return code, seconds

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(timeout=10)


@pytest.fixture
def agelab() -> Iterator[Callable[..., Agelab]]:
    started: list[Agelab] = []

    def start(*args: str) -> Agelab:
        started.append(Agelab(list(args)))
        return started[-1]

    yield start
    for run in started:
        run.close()


def rerun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*AGELAB, *args], capture_output=True, text=True, env=_env(), timeout=timeout
    )


def check_interrupted(code: int, seconds: float, output: str) -> None:
    assert code == 130, f"exit {code}:\n{output[-3000:]}"
    assert seconds <= STOP_S, f"took {seconds:.1f} s to stop after Ctrl-C:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert "interrupted" in printed_lines(output)[-1], output[-3000:]


def printed_lines(output: str) -> list[str]:
    """The lines a terminal shows: progress bars' escape sequences and redraws removed."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output)
    return [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]


def leftovers(folder: Path) -> list[str]:
    """Temp files of an interrupted writer (cache entries, report files)."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def write_study(tmp_path: Path, **sections) -> Path:
    raw = tiny_study(tmp_path, "sig", **sections)
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    raw["train"]["device"] = "cpu"
    path = tmp_path / "sig.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def trial_runs(root: Path) -> dict[str, list[str]]:
    """MLflow status → cells of the study's trial runs."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sig")
    out: dict[str, list[str]] = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        if run.data.tags.get(TAG_KIND) == "trial":
            out.setdefault(run.info.status, []).append(run.data.tags["agelab.cell"])
    return out


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_while_generating_synthetic_faces(tmp_path: Path, agelab) -> None:
    cache = tmp_path / "cache"
    # 391 chunks, about 7 s of rendering on two threads: a stop that waited for the queued
    # chunks would take nearly all of them.
    args = ["data.synthetic.n_images=25000", "data.image_size=64", f"data.cache_dir={cache}"]
    run = agelab("data", "synth", *args)
    run.wait_for(lambda out: "synthetic faces 64px" in out, "the generation's progress bar")
    time.sleep(0.3)
    check_interrupted(*run.ctrl_c(), run.output)
    assert not cache.exists() or not any(cache.glob("*.json")), "an entry of unfinished data"
    assert not cache.exists() or not leftovers(cache)

    again = rerun("data", "synth", "--quiet", *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "25000 synthetic faces" in again.stdout and "generated and cached" in again.stdout
    assert len(list(cache.glob("*.json"))) == 1 and not leftovers(cache)


def jpeg_dataset(folder: Path, n: int) -> Path:
    """``n`` distinct 1000×1000 JPEG files (about 10 ms each to decode) and labels.csv.

    One encoded image with a different comment segment in each copy: distinct files (no two
    byte-identical) written in well under a second."""
    y, x = np.mgrid[0:1000, 0:1000]
    pixels = np.stack([x * 255 // 1000, y * 255 // 1000, (x + y) * 255 // 2000], -1)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=85)
    jpeg = buf.getvalue()
    (folder / "images").mkdir(parents=True)
    rows = ["path,age,subject"]
    for i in range(n):
        comment = f"agelab test face {i}".encode()
        segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
        (folder / "images" / f"{i:05d}.jpg").write_bytes(jpeg[:2] + segment + jpeg[2:])
        rows.append(f"images/{i:05d}.jpg,{20 + (i * 7) % 60},s{i // 2}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


@pytest.mark.slow
def test_ctrl_c_while_decoding_images(tmp_path: Path, agelab) -> None:
    # About 6 s of decoding on two threads, which a stop that waited for them would take.
    labels = jpeg_dataset(tmp_path / "faces", 1200)
    study = write_study(
        tmp_path, data={"source": "csv", "path": str(labels)}, report={"auto": False}
    )
    run = agelab("run", str(study))
    run.wait_for(lambda out: "decoding csv images" in out, "the decoding progress bar")
    time.sleep(0.3)
    check_interrupted(*run.ctrl_c(), run.output)
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.glob("*.json")), "an entry of unfinished data"
    assert not cache.exists() or not leftovers(cache)

    again = rerun("run", str(study), "--quiet", "--n-trials", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(list(cache.glob("csv-*.json"))) == 1 and not leftovers(cache)
    assert len(trial_runs(tmp_path / "mlruns").get("FINISHED", [])) == 1


@pytest.mark.slow
def test_ctrl_c_while_training_requeues_the_trial(tmp_path: Path, agelab) -> None:
    study = write_study(
        tmp_path,
        train={"epochs": 3, "progress": True},
        search={"seeds": [0], "space": {"model.norm": ["batch", "none"]}},
        report={"auto": False},
    )
    run = agelab("run", str(study))
    run.wait_for(lambda out: "epoch 1/3" in out, "the first epoch's progress bar")
    check_interrupted(*run.ctrl_c(), run.output)
    runs = trial_runs(tmp_path / "mlruns")
    assert "RUNNING" not in runs, runs
    assert len(runs.get("KILLED", [])) == 1, f"the interrupted trial's run is not closed: {runs}"

    again = rerun("run", str(study), "--quiet")
    assert again.returncode == 0, again.stdout + again.stderr
    runs = trial_runs(tmp_path / "mlruns")
    assert sorted(runs["FINISHED"]) == sorted(set(runs["FINISHED"])), "a cell trained twice"
    assert len(runs["FINISHED"]) == 2, runs
    assert runs["KILLED"][0] in runs["FINISHED"], "the interrupted cell was not trained again"


@pytest.fixture
def finished_study(tmp_path: Path) -> Path:
    """A tiny completed study whose report (figures on) has not been written yet."""
    path = write_study(tmp_path, report={"auto": False, "figures": True})
    summary = run_study(validate(yaml.safe_load(path.read_text())), quiet=True)
    assert summary.counts["COMPLETE"] == 4, summary.counts
    return path


@pytest.mark.slow
def test_ctrl_c_while_writing_the_report(tmp_path: Path, agelab, finished_study: Path) -> None:
    folder = tmp_path / "mlruns" / "reports" / "sig"
    run = agelab("report", str(finished_study))
    # The first figure is on disk: the report is being drawn, its page not yet written.
    run.wait_for(lambda _: (folder / "figures" / "heatmap.png").exists(), "the first figure")
    check_interrupted(*run.ctrl_c(), run.output)
    assert not (folder / "report.html").exists() and not (folder / "report.md").exists()
    assert not leftovers(folder), "half-written report files"

    again = rerun("report", str(finished_study))
    assert again.returncode == 0, again.stdout + again.stderr
    html = (folder / "report.html").read_text()
    assert html.rstrip().endswith("</html>") and "data:image/png;base64," in html
    assert not leftovers(folder)


# -------------------------------------------------------------------------- servers


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting a server fails the test (instead of serving until the test times out)."""
    import agelab.ui

    def started(*_a, **_k):
        raise AssertionError("a server was started")

    monkeypatch.setattr(agelab.ui, "run_process_group", started)
    monkeypatch.setattr(agelab.ui, "serve_wsgi", started)


def mlflow_store(root: Path) -> Path:
    root.mkdir(parents=True)
    MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments()  # creates the tables
    return root


def optuna_journal(root: Path) -> Path:
    import optuna

    journal = root / "optuna" / "journal.log"
    optuna.create_study(storage=open_storage(f"journal:{journal}"), study_name="dash")
    return journal


def test_ui_on_a_busy_port_says_which_and_what_to_do(
    tmp_path: Path, busy_port: int, no_server, capsys
) -> None:
    root = mlflow_store(tmp_path / "mlruns")
    capsys.readouterr()  # MLflow's messages while making the store
    assert main(["ui", "--root", str(root), "--port", str(busy_port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"port {busy_port} on 127.0.0.1 is already in use" in err and "--port " in err


def test_dashboard_on_a_busy_port_says_which_and_what_to_do(
    tmp_path: Path, busy_port: int, no_server, capsys
) -> None:
    optuna_journal(tmp_path / "mlruns")
    capsys.readouterr()
    argv = ["dashboard", "--root", str(tmp_path / "mlruns"), "--port", str(busy_port)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"port {busy_port} on 127.0.0.1 is already in use" in err and "DASH_PORT=" in err


@pytest.mark.parametrize(
    ("command", "missing"), [("ui", "mlflow.db"), ("dashboard", "optuna/journal.log")]
)
def test_no_store_is_refused_not_served_empty(
    tmp_path: Path, command: str, missing: str, no_server, capsys
) -> None:
    root = tmp_path / "mlruns"
    assert main([command, "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{root / missing}: there is nothing to show yet" in err and "make demo" in err
    assert not (root / missing).exists(), "the missing store was created"


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first); None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> dict[tuple[int, str], str]:
    """Every living descendant of ``pid``: (pid, start time) → command line."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        stat = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None and stat[0] != "Z":
            parents.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = {}, [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            stat = proc_stat(child)
            if stat is not None:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                found[(child, stat[19])] = cmd.decode(errors="replace")
                todo.append(child)
    return found


def living(procs: dict[tuple[int, str], str]) -> dict[tuple[int, str], str]:
    """Those of ``procs`` still running (a zombie has ended; a new start time is another)."""
    out = {}
    for (pid, start), cmd in procs.items():
        stat = proc_stat(pid)
        if stat is not None and stat[0] != "Z" and stat[19] == start:
            out[(pid, start)] = cmd
    return out


def wait_for_url(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{url} never answered (exit {proc.poll()})")
            time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_agelab_ui_ends_every_process_it_started(tmp_path: Path, sig) -> None:
    """MLflow's server, its workers and its job runner go with `agelab ui`, whether it is
    asked to stop (SIGTERM) or killed outright (SIGKILL: no handler runs)."""
    root = mlflow_store(tmp_path / "mlruns")
    port = free_port()
    # Job execution on (MLflow's default) is what starts the slowest processes to stop.
    env = _env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="true", MLFLOW_WORKERS="1")
    cmd = [*AGELAB, "ui", "--root", str(root), "--port", str(port)]
    log = (tmp_path / "ui.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
    tree: dict[tuple[int, str], str] = {}
    try:
        wait_for_url(f"http://127.0.0.1:{port}/health", proc)
        deadline = time.monotonic() + 120
        while not any("huey" in c for c in tree.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            tree |= descendants(proc.pid)
        assert any("huey" in c for c in tree.values()), f"no job runner started: {tree}"
        tree = living(tree | descendants(proc.pid))
        t0 = time.monotonic()
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
        while living(tree) and time.monotonic() - t0 < 15:
            time.sleep(0.1)
        left = living(tree)
        assert not left, f"left running after {sig.name}: {sorted(left.values())}"
        if sig == signal.SIGTERM:
            assert code == 0, (tmp_path / "ui.log").read_text()[-3000:]
            assert time.monotonic() - t0 <= STOP_S + 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, _start in living(tree):
            os.kill(pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
def test_sigterm_stops_agelab_dashboard_while_it_serves(tmp_path: Path) -> None:
    """Also when the signal arrives in the middle of a request (wsgiref answers an exception
    raised there with an error page and serves on)."""
    journal = optuna_journal(tmp_path / "mlruns")
    port = free_port()
    cmd = [*AGELAB, "dashboard", "--storage", f"journal:{journal}", "--port", str(port)]
    out = subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/studies"
    done = threading.Event()

    def keep_asking() -> None:  # requests back to back: the server is nearly always busy
        while not done.is_set():
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url, timeout=5).read()

    asker = threading.Thread(target=keep_asking, daemon=True)
    try:
        wait_for_url(url, proc)
        tree = descendants(proc.pid)
        asker.start()
        time.sleep(1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        seconds = time.monotonic() - t0
        assert proc.returncode == 0 and seconds <= STOP_S, (proc.returncode, seconds)
        assert not living(tree)
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        asker.join(timeout=10)

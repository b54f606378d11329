"""Helpers shared by the benchmark modules: statistics, machine facts, output capture, the
MLflow global URI guard and the study configs the study/tracking benchmarks run."""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]


def summary(values: list[float]) -> dict[str, Any]:
    """min / median / max of repeated measurements (and the raw values)."""
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "all": list(values),
    }


def proc_status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmHWM`` peak RSS, ``VmRSS``); None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes have been busy, CPU seconds of this process and its
    waited-for children): the difference over a run is the load others put on the machine."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in fields]
    except (OSError, ValueError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return busy / os.sysconf("SC_CLK_TCK"), own


def others_load(start: tuple[float, float] | None, seconds: float) -> float | None:
    """Average number of cores other processes kept busy since ``start`` (cpu_seconds())."""
    end = cpu_seconds()
    if start is None or end is None or seconds <= 0:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / seconds)


def machine() -> dict[str, Any]:
    """What the absolute numbers depend on: CPU, cores, torch threads, GPU."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": gpu,
        "device": "cuda" if gpu else "cpu",
        "memory_gib": _memory_gib(),
    }


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


_console: list[int] = []  # the real stdout while :func:`captured` redirects fd 1


def say(text: str) -> None:
    """Print a benchmark's own line to the console, even inside :func:`captured`."""
    if _console:
        os.write(_console[-1], (text + "\n").encode())
    else:
        print(text, flush=True)


@contextlib.contextmanager
def captured(log_path: Path) -> Iterator[Path]:
    """Send this process's stdout/stderr (the file descriptors, so child processes and C
    libraries follow) to ``log_path`` for the duration; :func:`say` still reaches the
    console."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log_path.open("ab") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        _console.append(saved[0])
        try:
            yield log_path
        finally:
            _console.pop()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def log_tail(log_path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def mlflow_global_uri(uri: str) -> Iterator[None]:
    """MLflow's *global* tracking URI at ``uri`` for the baselines that use the fluent API
    (``mlflow.log_metric``, optuna-integration's ``MLflowCallback``), their runs ended and
    the previous URI and ``$MLFLOW_TRACKING_URI`` restored after (or the next study would
    log there)."""
    import mlflow

    from agelab.tracking import global_tracking_uri

    with global_tracking_uri(uri):
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                while mlflow.active_run() is not None:
                    mlflow.end_run()


_template_db: list[Path] = []


def empty_store(db: Path) -> str:
    """An MLflow SQLite store at ``db`` with its tables created; returns its URI.

    MLflow's migrations take seconds, so they run once per process and later stores are
    copies of that empty file (stores are created outside every timing anyway)."""
    db = db.resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    if not db.exists():
        if not _template_db:
            from mlflow.tracking import MlflowClient

            folder = Path(tempfile.mkdtemp(prefix="agelab-bench-store-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            template = folder / "empty.db"
            MlflowClient(f"sqlite:///{template}").search_experiments()
            _template_db.append(template)
        shutil.copyfile(_template_db[0], db)
    return f"sqlite:///{db}"


def demo_raw() -> dict[str, Any]:
    """The demo study (``experiments/demo.yaml``) as a raw mapping."""
    from agelab.config import load_raw

    for path in (Path("experiments/demo.yaml"), REPO / "experiments" / "demo.yaml"):
        if path.is_file():
            return load_raw(path)
    raise FileNotFoundError(
        "experiments/demo.yaml not found: run the benchmark from the agelab repository"
    )


def bench_config(
    root: Path,
    name: str,
    *,
    cache_dir: Path,
    image_size: int | None = None,
    n_images: int | None = None,
    epochs: int | None = None,
    seeds: list[int] | None = None,
    space: dict[str, list[Any]] | None = None,
    log_figures: bool = True,
    threads: int | None = None,
):
    """The demo study, optionally shrunk, on its own store under ``root`` (created empty).

    Every store is explicit (SQLite file, Optuna journal, data cache), so neither the user's
    ``mlruns/`` nor ``$MLFLOW_TRACKING_URI`` / ``$AGELAB_OPTUNA_STORAGE`` is touched; no
    ablation report at the end (it is a per-study cost, not a per-trial one)."""
    from agelab.config import StudyConfig, validate

    raw = demo_raw()
    raw["name"] = name
    data = raw.setdefault("data", {})
    data["cache_dir"] = str(cache_dir)
    if image_size is not None:
        data["image_size"] = image_size
    if n_images is not None:
        data.setdefault("synthetic", {})["n_images"] = n_images
    train = raw.setdefault("train", {})
    train["progress"] = False
    if epochs is not None:
        train["epochs"] = epochs
    if threads is not None:
        train["threads"] = threads
    if seeds is not None:
        raw.setdefault("search", {})["seeds"] = seeds
    if space is not None:
        raw.setdefault("search", {})["space"] = space
    root = root.resolve()
    raw["tracking"] = {
        "root": str(root),
        "uri": empty_store(root / "mlflow.db"),
        "storage": f"journal:{root / 'optuna' / 'journal.log'}",
        "log_figures": log_figures,
    }
    if "report" in StudyConfig.model_fields:
        raw["report"] = {"auto": False}
    return validate(raw, f"bench study {name!r}")


def describe_config(cfg, *, trials: bool = True) -> str:
    """``resnet10t 48px, 2400 images, 6 epochs, 8 trials, figures on`` for the tables."""
    parts = [
        f"{cfg.model.backbone} {cfg.data.image_size}px",
        f"{cfg.data.synthetic.n_images} images",
        f"{cfg.train.epochs} epoch{'s' if cfg.train.epochs != 1 else ''}",
    ]
    if trials:
        parts.append(f"{cfg.search.n_total()} trials")
    parts.append(f"figures {'on' if cfg.tracking.log_figures else 'off'}")
    return ", ".join(parts)

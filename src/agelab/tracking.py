"""MLflow behind one seam: the only module that imports mlflow.

Runs are addressed by id through ``MlflowClient`` rather than mlflow's global "active run",
so several trials, threads or worker processes never step on each other's state. Every
write goes through :meth:`Tracker._call`, which retries SQLite's transient "database is
locked" errors (several local workers share one ``mlruns/mlflow.db``) with backoff.

Default store: ``sqlite:///mlruns/mlflow.db`` with artifacts in ``mlruns/artifacts``. Any
MLflow tracking URI (a tracking server, PostgreSQL) comes from the config or
``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from agelab.config import TrackingConfig

T = TypeVar("T")

# MLflow run statuses (strings, so callers need not import mlflow).
FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"

# Tags agelab writes; the worker tags let a later invocation close runs of dead processes.
TAG_WORKER_HOST = "agelab.worker_host"
TAG_WORKER_PID = "agelab.worker_pid"
TAG_TRIAL = "agelab.trial_number"
TAG_STUDY = "agelab.study"
TAG_STATE = "agelab.state"
TAG_REASON = "agelab.fail_reason"
TAG_KIND = "agelab.run_kind"  # "study" (parent) | "trial" (nested)


class StoreError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable folder)."""


def mask_uri(uri: str) -> str:
    """Hide the password of ``scheme://user:password@host`` URIs for logs and tags."""
    uri = re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", uri)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", uri, flags=re.I)


def default_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(cfg.root / 'mlflow.db').resolve()}"


def default_artifact_location(cfg: TrackingConfig, experiment: str) -> str | None:
    if cfg.artifact_location:
        return cfg.artifact_location.rstrip("/") + "/" + experiment
    uri = default_uri(cfg)
    if uri.startswith("http://") or uri.startswith("https://"):
        return None  # the server decides (its --artifacts-destination)
    return (cfg.root / "artifacts" / experiment).resolve().as_uri()


def probe_writable(folder: Path) -> None:
    """Fail before any training when the store folder cannot be written (full, read-only)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        with probe.open("wb") as fh:
            fh.write(b"\0" * 65536)
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        raise StoreError(
            f"cannot write to the tracking folder {folder}: {exc.strerror or exc}. "
            "Free some space or fix its permissions, or point tracking.root / "
            "MLFLOW_TRACKING_URI elsewhere."
        ) from None


def _check_server(uri: str, timeout: float = 5.0) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            resp.read(64)
    except Exception as exc:
        raise StoreError(
            f"MLflow tracking server {mask_uri(uri)} is unreachable ({exc}); start it "
            "(see README: many machines) or unset MLFLOW_TRACKING_URI to use the local store."
        ) from None


def _git(*args: str) -> str | None:
    out = subprocess.run(
        ["git", *args],
        capture_output=True,
        text=True,
        timeout=5,
        cwd=Path(__file__).resolve().parent,
    )
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """The commit agelab runs from (``-dirty`` with uncommitted changes), for run tags."""
    try:
        commit = _git("rev-parse", "--short=12", "HEAD")
        if commit is None:
            return "unknown"
        return commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sanitize_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . / and space.
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)


class Tracker:
    """One MLflow experiment (a study) and its runs."""

    def __init__(self, cfg: TrackingConfig, experiment: str, *, retries: int = 12):
        import mlflow  # noqa: F401  (heavy; imported here on purpose)
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.uri = default_uri(cfg)
        self.experiment_name = experiment
        self.retries = retries
        if self.uri.startswith(("http://", "https://")):
            _check_server(self.uri)
        elif self.uri.startswith("sqlite:///") or "://" not in self.uri:
            probe_writable(cfg.root)
            (cfg.root / "artifacts").mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._ensure_experiment()

    # ---------------------------------------------------------------- plumbing
    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call an MlflowClient method, retrying transient database-lock errors."""
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                text = str(exc).lower()
                transient = (
                    "database is locked" in text
                    or "deadlock" in text
                    or ("could not serialize" in text)
                )
                if not transient or attempt == self.retries:
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def _ensure_experiment(self) -> str:
        exp = self._call(self.client.get_experiment_by_name, self.experiment_name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise StoreError(
                    f"MLflow experiment {self.experiment_name!r} is deleted; restore it in the "
                    "UI or rename the study"
                )
            return exp.experiment_id
        try:
            return self._call(
                self.client.create_experiment,
                self.experiment_name,
                artifact_location=default_artifact_location(self.cfg, self.experiment_name),
            )
        except Exception:
            # Another worker created it between our lookup and create.
            exp = self._call(self.client.get_experiment_by_name, self.experiment_name)
            if exp is None:
                raise
            return exp.experiment_id

    # -------------------------------------------------------------------- runs
    def start_run(
        self,
        name: str,
        *,
        tags: dict[str, Any],
        parent_id: str | None = None,
    ) -> str:
        tags = {k: mask_uri(str(v)) for k, v in tags.items()}
        tags[TAG_WORKER_HOST] = socket.gethostname()
        tags[TAG_WORKER_PID] = str(os.getpid())
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self._call(
            self.client.create_run,
            self.experiment_id,
            run_name=name,
            tags=tags,
        )
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # Any URI-shaped value (tracking.uri, tracking.storage, data paths) loses its password.
        items = [Param(_sanitize_key(k), mask_uri(str(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params a call
            self._call(self.client.log_batch, run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """One batched call for a whole epoch's (or a whole evaluation's) metrics."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(_sanitize_key(k), float(v), now, step)
            for k, v in metrics.items()
            if v is not None
        ]
        for i in range(0, len(items), 1000):
            self._call(self.client.log_batch, run_id, metrics=items[i : i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(_sanitize_key(k), mask_uri(str(v))[:5000]) for k, v in tags.items()]
        if items:
            self._call(self.client.log_batch, run_id, tags=items)

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        self._call(self.client.log_artifacts, run_id, str(folder), artifact_path)

    def end_run(self, run_id: str, status: str = FINISHED) -> None:
        self._call(self.client.set_terminated, run_id, status)

    def run_status(self, run_id: str) -> str | None:
        try:
            return self._call(self.client.get_run, run_id).info.status
        except Exception:
            return None

    def search(self, filter_string: str = "", max_results: int = 50_000) -> list:
        return list(
            self._call(
                self.client.search_runs,
                [self.experiment_id],
                filter_string,
                max_results=max_results,
            )
        )

    def running_runs(self) -> Iterable:
        return self.search("attributes.status = 'RUNNING'")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind_allowed(host: str, expose: bool, who: str) -> bool:
    """UIs bind to loopback unless the user explicitly exposes them (they have no auth)."""
    if host in LOOPBACK or expose:
        return True
    print(
        f"{who}: refusing to bind {host}: it has no authentication and anyone who reaches it "
        "can read and change your runs. Pass --expose to do it anyway.",
        file=sys.stderr,
    )
    return False


def serve_ui(*, host: str, port: int, root: Path, expose: bool) -> int:
    """``mlflow ui`` over the default store, on loopback unless ``expose`` is given."""
    if not bind_allowed(host, expose, "agelab ui"):
        return 2
    uri = default_uri(TrackingConfig(root=root))
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        (root / "artifacts").resolve().as_uri(),
        "--host",
        host,
        "--port",
        str(port),
    ]
    print(f"MLflow UI on http://{host}:{port}  (store {mask_uri(uri)}; Ctrl-C stops)")
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0

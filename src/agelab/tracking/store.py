"""The tracking store: one MLflow experiment per study, runs addressed by id.

Runs are addressed by id through ``MlflowClient`` rather than mlflow's global "active run",
so several trials, threads or worker processes never step on each other's state. Every
write goes through :meth:`Tracker._call`, which retries SQLite's transient "database is
locked" errors (several local workers share one ``mlruns/mlflow.db``) with backoff.

Default store: ``sqlite:///mlruns/mlflow.db`` with artifacts in ``mlruns/artifacts``. Any
MLflow tracking URI (a tracking server, PostgreSQL) comes from the config or
``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agelab.config import TrackingConfig
from agelab.config.schema import contained_name
from agelab.errors import StoreError
from agelab.faults import kill_point
from agelab.secrets import mask_uri, register_uri, scrub

if TYPE_CHECKING:
    import pandas as pd

    from agelab.tracking.datasets import DatasetRecord

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
TAG_DESCRIPTION = "agelab.description"  # the study's description (the note adds the verdict)
# MLflow's own: a run's or an experiment's description (Markdown), and the experiment's kind,
# which makes MLflow 3's UI open an experiment on its runs instead of GenAI pages.
TAG_NOTE = "mlflow.note.content"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def default_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(cfg.root / 'mlflow.db').resolve()}"


def default_artifact_location(cfg: TrackingConfig, experiment: str) -> str | None:
    # The name becomes a folder: "../x" or "/x" would put the artifacts outside the store.
    contained_name(experiment, "an MLflow experiment's folder name", "tracking.experiment")
    if cfg.artifact_location:
        return cfg.artifact_location.rstrip("/") + "/" + experiment
    uri = default_uri(cfg)
    if uri.startswith("http://") or uri.startswith("https://"):
        return None  # the server decides (its --artifacts-destination)
    return (cfg.root / "artifacts" / experiment).resolve().as_uri()


def check_writable(cfg: TrackingConfig) -> None:
    """A local store (SQLite, files: the default) must take a write before any work starts;
    the Optuna journal lives in the same folder. Remote stores are checked when opened."""
    uri = default_uri(cfg)
    if uri.startswith("sqlite:///") or "://" not in uri:
        probe_writable(cfg.root)
        (cfg.root / "artifacts").mkdir(parents=True, exist_ok=True)


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


@contextlib.contextmanager
def _sqlite_create_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock beside a SQLite store's file (no-op for other stores)."""
    db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
    if db is None or not db.parent.is_dir():
        yield
        return
    try:
        fh = open(db.parent / f".{db.name}.lock", "a")  # noqa: SIM115 (closed below)
    except OSError:  # read-only folder: nothing can be created there anyway
        yield
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fh.close()  # releases the lock


DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}


def is_database_uri(uri: str) -> bool:
    """A SQLAlchemy URI of a database server (not SQLite, files or HTTP)."""
    return uri.split("://", 1)[0].split("+", 1)[0].lower() in DB_PORTS and "://" in uri


def check_database(uri: str, what: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` s, naming the (masked) URI, when a database server cannot be
    used: unreachable (MLflow would retry for ~2 minutes), or refusing the connection."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    register_uri(uri)  # whatever the drivers say below, its password is masked
    try:
        url = make_url(uri)
    except Exception as exc:
        raise StoreError(mask_uri(f"{what} {uri} is not a valid database URI ({exc})")) from None
    if url.host and "@" in url.host:  # "u:p@ss@host": SQLAlchemy splits at the first "@"
        raise StoreError(
            mask_uri(f"{what} {uri}: the password holds an '@'; write it as %40 in the URI")
        )

    hint = (
        "start the database (README: many machines), fix the URI, or unset it to use the "
        "local default store"
    )
    if url.host:  # a unix-socket URI has no host: the connection below checks it
        port = url.port or DB_PORTS[url.get_backend_name()]
        try:
            socket.create_connection((url.host, port), timeout=timeout).close()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__ or str(exc)
            if isinstance(exc, TimeoutError | socket.timeout):
                reason = f"no answer within {timeout:g} s"
            raise StoreError(
                mask_uri(f"{what} {uri} is unreachable ({url.host}:{port}: {reason}); {hint}")
            ) from None
    # psycopg and the MySQL drivers take connect_timeout; other drivers keep their default.
    known = url.get_backend_name() in ("postgresql", "postgres", "mysql", "mariadb")
    connect_args = {"connect_timeout": max(1, int(timeout))} if url.host and known else {}
    try:
        engine = sqlalchemy.create_engine(
            uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool
        )
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreError(mask_uri(f"{what} {uri} cannot be used: {first}; {hint}")) from None


def _corrupt_store(uri: str, exc: Exception) -> StoreError | None:
    """A SQLite store that is not (or no longer) a database: say which file and what to do."""
    text = str(exc).lower()
    if not uri.startswith("sqlite:///") or not (
        "file is not a database" in text or "malformed" in text
    ):
        return None
    db = uri[len("sqlite:///") :]
    return StoreError(
        f"the MLflow store {db} is corrupt ({str(exc).strip().splitlines()[0][:120]}). Restore "
        f"a backup of it, or move it aside (mv {db} {db}.corrupt) and run again: the Optuna "
        "study still knows what ran, and `agelab run` re-runs the cells whose runs are gone"
    )


def _check_server(uri: str, timeout: float = 5.0) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            resp.read(64)
    except Exception as exc:
        register_uri(uri)
        raise StoreError(
            mask_uri(
                f"MLflow tracking server {uri} is unreachable ({exc}); start it (see README: "
                "many machines) or unset MLFLOW_TRACKING_URI to use the local store."
            )
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

    def __init__(
        self, cfg: TrackingConfig, experiment: str, *, retries: int = 12, create: bool = True
    ):
        """``create=False`` opens an existing experiment only (readers such as the report):
        a missing store or experiment is a :class:`StoreError`, and nothing is created."""
        import mlflow  # noqa: F401  (heavy; imported here on purpose)
        from mlflow.tracking import MlflowClient

        # MLflow's SQL store logs every database error it re-raises with a full traceback;
        # agelab says what happened in one line (or keeps the traceback of a real bug).
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

        self.cfg = cfg
        self.uri = default_uri(cfg)
        self.experiment_name = experiment
        self.retries = retries
        self.calls = 0  # MLflow calls made through _call, and their wall time (agelab bench)
        self.call_seconds = 0.0
        self._monitors: dict[str, Any] = {}  # run id → its system-metrics sampler
        if self.uri.startswith(("http://", "https://")):
            _check_server(self.uri)
        elif is_database_uri(self.uri):
            check_database(self.uri, "MLflow tracking store")
        elif self.uri.startswith("sqlite:///"):
            db = Path(self.uri[len("sqlite:///") :])
            if not create and not db.is_file():
                raise StoreError(
                    mask_uri(
                        f"no tracking store at {db}: run a study first, or set tracking.root / "
                        "MLFLOW_TRACKING_URI to the store that has it"
                    )
                )
        if create:
            check_writable(cfg)
        # Two studies starting at once on a new SQLite store would both create its tables
        # (MLflow's migrations are not concurrency-safe): one at a time, per store.
        with _sqlite_create_lock(self.uri):
            try:
                self.client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = self._ensure_experiment(create)
            except Exception as exc:
                corrupt = _corrupt_store(self.uri, exc)
                if corrupt is None:
                    raise
                raise corrupt from None

    @property
    def display_uri(self) -> str:
        """The store's URI with any password masked (for messages and reports)."""
        return mask_uri(self.uri)

    # ---------------------------------------------------------------- plumbing
    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call an MlflowClient method, retrying transient database-lock errors; counts the
        calls and their wall time, retries included (``calls``, ``call_seconds``)."""
        t0 = time.perf_counter()
        try:
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
        finally:
            self.calls += 1
            self.call_seconds += time.perf_counter() - t0

    def _ensure_experiment(self, create: bool = True) -> str:
        exp = self._call(self.client.get_experiment_by_name, self.experiment_name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise StoreError(
                    f"MLflow experiment {self.experiment_name!r} is deleted; restore it in the "
                    "UI or rename the study"
                )
            return exp.experiment_id
        if not create:
            names = [
                e.name for e in self._call(self.client.search_experiments) if e.name != "Default"
            ]
            raise StoreError(
                f"no MLflow experiment {self.experiment_name!r} in {self.display_uri} "
                f"(it has: {', '.join(sorted(names)) or 'none'}); check the study name"
            )
        try:
            return self._call(
                self.client.create_experiment,
                self.experiment_name,
                artifact_location=default_artifact_location(self.cfg, self.experiment_name),
                tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND},
            )
        except Exception:
            # Another worker created it between our lookup and create.
            exp = self._call(self.client.get_experiment_by_name, self.experiment_name)
            if exp is None:
                raise
            return exp.experiment_id

    def describe_experiment(self, description: str) -> None:
        """The experiment's kind (model training; only where none is set, so an experiment
        made before agelab tagged it gets one too) and its description: the study's, unless
        the description already begins with it (the report's verdict follows it there,
        :meth:`set_experiment_note`) or the study has none (whatever the UI's users wrote
        stays)."""
        exp = self._call(self.client.get_experiment, self.experiment_id)
        tags = {} if TAG_EXPERIMENT_KIND in exp.tags else {TAG_EXPERIMENT_KIND: EXPERIMENT_KIND}
        description = scrub(description.strip())
        if description and not exp.tags.get(TAG_NOTE, "").startswith(description):
            tags[TAG_NOTE] = description
        for key, value in tags.items():
            self._call(self.client.set_experiment_tag, self.experiment_id, key, value[:20000])

    def set_experiment_note(self, note: str) -> None:
        """The experiment's description (Markdown, above its runs table in the UI)."""
        value = scrub(note)[:20000]
        self._call(self.client.set_experiment_tag, self.experiment_id, TAG_NOTE, value)

    # -------------------------------------------------------------------- runs
    def start_run(
        self,
        name: str,
        *,
        tags: dict[str, Any],
        parent_id: str | None = None,
        system_metrics: bool = False,
    ) -> str:
        """A new run; with ``system_metrics``, MLflow samples the machine (``system/…``
        metrics) on it until :meth:`end_run`."""
        tags = {k: scrub(v) for k, v in tags.items()}
        tags[TAG_WORKER_HOST] = socket.gethostname()
        tags[TAG_WORKER_PID] = str(os.getpid())
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self._call(
            self.client.create_run,
            self.experiment_id,
            run_name=scrub(name),
            tags=tags,
        )
        if system_metrics:
            self._start_system_metrics(run.info.run_id)
        return run.info.run_id

    def _start_system_metrics(self, run_id: str) -> None:
        """MLflow's own sampler (a daemon thread: CPU, memory, disk, network, and every GPU
        NVML sees when nvidia-ml-py is installed), on this store; it needs psutil."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as exc:
            raise StoreError(
                f"tracking.system_metrics needs psutil ({exc}): pip install psutil, or set "
                "tracking.system_metrics=false"
            ) from None
        # Its INFO lines ("Started monitoring…") would print once per trial.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        monitor = SystemMetricsMonitor(run_id, tracking_uri=self.uri)
        monitor.start()
        self._monitors[run_id] = monitor

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # Any URI-shaped value (tracking.uri, tracking.storage, data paths) loses its password.
        items = [Param(_sanitize_key(k), scrub(v)[:6000]) for k, v in params.items()]
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
            kill_point("mlflow.log_metrics")
            self._call(self.client.log_batch, run_id, metrics=items[i : i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(_sanitize_key(k), scrub(v)[:5000]) for k, v in tags.items()]
        if items:
            self._call(self.client.log_batch, run_id, tags=items)

    def log_datasets(self, run_id: str, records: Iterable[DatasetRecord]) -> None:
        """What the run trained and was scored on, as MLflow dataset inputs: one call
        (:mod:`agelab.tracking.datasets`: names, digests, sources, profiles)."""
        from agelab.tracking.datasets import dataset_inputs

        inputs = dataset_inputs(list(records))
        if inputs:
            self._call(self.client.log_inputs, run_id, datasets=inputs)

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        kill_point("mlflow.log_artifacts")
        self._call(self.client.log_artifacts, run_id, str(folder), artifact_path)

    def download_artifact(self, run_id: str, path: str, dst: Path) -> Path | None:
        """One artifact of a run into ``dst`` (None when the run has no such artifact)."""
        dst.mkdir(parents=True, exist_ok=True)
        # No progress bar (MLflow draws one per file).
        with env_kept("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
            try:
                return Path(self._call(self.client.download_artifacts, run_id, path, str(dst)))
            except Exception:
                return None

    def end_run(self, run_id: str, status: str = FINISHED) -> None:
        monitor = self._monitors.pop(run_id, None)
        if monitor is not None:  # its last samples are written while the run is open
            monitor.finish()
        self._call(self.client.set_terminated, run_id, status)

    def artifact_names(self, run_id: str) -> set[str]:
        """Top-level artifact names of a run (empty when its folder is gone). Any other
        failure to list them (a store that does not answer) is raised, never read as
        "missing"."""
        from mlflow.exceptions import MlflowException

        try:
            return {a.path for a in self._call(self.client.list_artifacts, run_id)}
        except FileNotFoundError:
            return set()
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return set()
            raise

    def get_run(self, run_id: str):
        """A run by id, in any experiment of this store; None when there is no such run
        (deleted runs included). Other failures are raised."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._call(self.client.get_run, run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return None if run.info.lifecycle_stage == "deleted" else run

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


def study_experiments(uri: str) -> list[tuple[str, str]]:
    """``(name, id)`` of each live experiment of the store ``uri`` that holds an agelab
    study (a study's parent run), by id; what ``agelab ui`` links to."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    client = MlflowClient(tracking_uri=uri)
    found = []
    for exp in client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=50_000):
        parents = client.search_runs(
            [exp.experiment_id], f"tags.`{TAG_KIND}` = 'study'", max_results=1
        )
        if parents:
            found.append((exp.name, exp.experiment_id))
    return sorted(found, key=lambda e: (len(e[1]), e[1]))  # numeric ids in numeric order


def runs_frame(runs: Iterable) -> pd.DataFrame:
    """MLflow runs → one row each: ``run_id``, ``run_name``, ``status``, ``start_time``
    (epoch ms), and ``params.<k>`` / ``tags.<k>`` / ``metrics.<k>`` (latest value) columns
    named as ``mlflow.search_runs`` names them. What agelab's report reads, free of mlflow
    types; a value a run never logged is NaN."""
    import pandas as pd

    rows = []
    for run in runs:
        info, data = run.info, run.data
        row = {
            "run_id": info.run_id,
            "run_name": info.run_name,
            "status": info.status,
            "start_time": info.start_time,
        }
        row |= {f"params.{k}": v for k, v in data.params.items()}
        row |= {f"tags.{k}": v for k, v in data.tags.items()}
        row |= {f"metrics.{k}": v for k, v in data.metrics.items()}
        rows.append(row)
    return pd.DataFrame(
        rows, columns=None if rows else ["run_id", "run_name", "status", "start_time"]
    )


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's *global* tracking (and registry) URI at ``uri`` for the duration, for
    the MLflow functions that read it (models, the registry, the fluent API), then put back
    the previous one *and* ``$MLFLOW_TRACKING_URI`` as they were (``mlflow.set_tracking_uri``
    exports the variable, MLflow's own ``_use_tracking_uri`` unsets it on the way out, and
    agelab's default store reads it)."""
    from mlflow.tracking._tracking_service import utils

    previous = utils._tracking_uri
    with env_kept("MLFLOW_TRACKING_URI"):
        utils.set_tracking_uri(uri)
        try:
            yield
        finally:
            utils.set_tracking_uri(previous)


@contextlib.contextmanager
def env_kept(name: str, value: str | None = None) -> Iterator[None]:
    """``$name`` as it was before the block, after it (unset if it was unset), whatever the
    block or the libraries it calls did to it; set to ``value`` for the block when given."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before

"""Every exception agelab raises on purpose, in one place.

:class:`UserError` is the base of the errors a user can fix (a bad study file, a bad data
row, an unknown backbone, an unreachable store, an unreadable checkpoint, a study with no
runs): their message says what is wrong and what to do, so the command line prints it on one
line and exits 2. Anything else that escapes is a bug and keeps its traceback. (Optuna does
the same with ``OptunaError``.)

:class:`TrialFailed` and :class:`TrainingDiverged` are not user errors: a study records them
as the trial's failure reason and goes on with the next trial.

The concrete classes also derive from the built-in they always were (``ValueError``,
``RuntimeError``), so pydantic validators that raise them still report a field error.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem the user can fix; the message names the file/field/URI and what to do."""


class ConfigError(UserError, ValueError):
    """A study file or override is invalid; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid study config {source}:\n{lines}")


class StudyConfigChanged(UserError):
    """A study is re-run with a config that changes its results; the message lists the changed
    fields and the ways forward (a new version, a new name, or undoing the change)."""

    def __init__(self, study: str, changed: list[str], ways: list[str]):
        self.study, self.changed, self.ways = study, changed, ways
        lines = [
            f"study {study!r} was run with another config; its results are not reused "
            "for this one.",
            "  changed: " + "; ".join(changed),
        ]
        lines += [f"  - {w}" for w in ways]
        super().__init__("\n".join(lines))


class DataError(UserError, ValueError):
    """A data problem (missing file, bad label, bad image); the message says where and what
    to do. ``reason`` is a short machine-readable kind, ``where`` the file or row."""

    def __init__(self, message: str, *, reason: str | None = None, where: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.where = where


class ModelError(UserError, ValueError):
    """A model request that cannot be honoured (unknown name, missing weights, rejected
    backbone); the message says what to change."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read or does not match; the message names the file."""


class StoreError(UserError, RuntimeError):
    """The tracking or study store cannot be used (unreachable server, unwritable folder,
    missing experiment)."""


class ReportError(UserError, RuntimeError):
    """A report cannot be made (no such study, no runs); the message says what to do."""


class DeviceError(UserError, RuntimeError):
    """The requested device cannot be used (``train.device: cuda`` where torch sees no usable
    GPU); the message names the driver and the CUDA build of torch, and what to do."""


class TrialFailed(RuntimeError):
    """A trial that cannot produce a result for a known reason (diverged, out of memory):
    recorded as the trial's failure, printed without a traceback."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf. ``epoch`` and ``step`` (1-based, step within the epoch) locate
    the first bad step; ``lr`` is the learning rate used there."""

    def __init__(self, epoch: int, step: int, lr: float, detail: str = "non-finite loss"):
        self.epoch, self.step, self.lr = epoch, step, lr
        super().__init__(
            f"training diverged: {detail} at epoch {epoch}, step {step} "
            f"(lr {lr:.3g}); lower train.lr or set train.grad_clip"
        )


# ------------------------------------------------------------------ transient failures

#: OS errors that say nothing about the trial: the machine or a store failed under it.
TRANSIENT_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "input/output error",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.ESTALE: "stale file handle",
    errno.ETIMEDOUT: "connection timed out",
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "broken pipe",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}
#: The same failures as store drivers word them (SQLite, PostgreSQL, MLflow's wrappers).
TRANSIENT_TEXTS = (
    "no space left on device",
    "disk quota exceeded",
    "database or disk is full",
    "disk i/o error",
    "input/output error",
    "read-only file system",
    "readonly database",
    "unable to open database file",
    "database is locked",
    "server closed the connection",
    "could not connect to server",
    "connection refused",
    "connection reset",
    "connection timed out",
    "terminating connection",
    "the database system is shutting down",
    "the database system is starting up",
    "could not translate host name",
    "ssl syscall error",
    "could not receive data from server",
    "remaining connection slots",
    "timeout expired",
    "temporarily unavailable",
    "broken pipe",
)
#: Exception types that only ever mean "the store or the network failed" (by name, so this
#: module needs neither sqlalchemy nor requests).
TRANSIENT_TYPES = {
    "sqlalchemy.exc.OperationalError",
    "sqlalchemy.exc.InterfaceError",
    "sqlalchemy.exc.DisconnectionError",
    "sqlalchemy.exc.TimeoutError",
    "requests.exceptions.ConnectionError",
    "requests.exceptions.Timeout",
    "urllib3.exceptions.ProtocolError",
}
#: Where a message is the store's own words: text matching is for these libraries only, so a
#: trial's own error that happens to say "broken pipe" is not mistaken for a store failure.
STORE_LIBRARIES = ("sqlite3", "sqlalchemy", "psycopg2", "psycopg", "pymysql", "mlflow",
                   "requests", "urllib3", "http", "optuna")  # fmt: skip


def transient_cause(exc: BaseException) -> str | None:
    """One line saying why, when ``exc`` (or what it was raised from) is a failure of the
    machine or a store — full disk, I/O error, read-only store, lost database connection, a
    server temporarily unavailable — rather than of the trial; else None. A trial stopped by
    one is retried by the next run; a trial's own failure (divergence, out of memory, a bug)
    is not."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = _own_cause(e)
        if cause is not None:
            return cause
        todo.append(e.__cause__)
        if not e.__suppress_context__:  # `raise … from None` cut the chain on purpose
            todo.append(e.__context__)
    return None


def _own_cause(e: BaseException) -> str | None:
    """The transient cause ``e`` itself carries, if any (its chain aside)."""
    if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
        where = f" ({e.filename})" if e.filename else ""
        return f"{TRANSIENT_ERRNOS[e.errno]}{where}"
    names = {f"{k.__module__}.{k.__qualname__}" for k in type(e).__mro__}
    library = type(e).__module__.split(".")[0]
    if names & TRANSIENT_TYPES or library in STORE_LIBRARIES or isinstance(e, OSError):
        for line in str(e).strip().splitlines():
            hit = next((s for s in TRANSIENT_TEXTS if s in line.lower()), None)
            if hit is not None:  # quote the driver's own line, not a wrapper's preamble
                return f"{hit} ({type(e).__name__}: {line.strip()[:200]})"
    # MLflow wraps every store error as TEMPORARILY_UNAVAILABLE: the driver's words (above,
    # e.g. "database or disk is full") say more than this, so they are looked for first.
    status = getattr(e, "get_http_status_code", lambda: None)()  # MLflow's REST errors
    if getattr(e, "error_code", "") == "TEMPORARILY_UNAVAILABLE" or status in (502, 503, 504):
        return f"the tracking server is unavailable ({type(e).__name__}: {_first(e)})"
    if names & TRANSIENT_TYPES:
        return f"the store's connection failed ({type(e).__name__}: {_first(e)})"
    return None


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""

"""Where a study lives: the Optuna storage, and opening a study with its sampler and pruner.

Default storage is a journal file beside the MLflow store (``mlruns/optuna/journal.log``);
``tracking.storage`` or ``$AGELAB_OPTUNA_STORAGE`` gives any Optuna storage URL (PostgreSQL
for many machines).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState

from agelab.config import StudyConfig
from agelab.errors import StoreError
from agelab.study.optuna_compat import RepairingJournalBackend
from agelab.tracking import check_database, is_database_uri

optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_url(cfg: StudyConfig) -> str:
    """Optuna storage: config, else $AGELAB_OPTUNA_STORAGE, else a journal file."""
    url = cfg.tracking.storage or os.environ.get("AGELAB_OPTUNA_STORAGE")
    return url or f"journal:{(cfg.tracking.root / 'optuna' / 'journal.log').resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileOpenLock

        path = Path(url[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open-lock works on any local filesystem (the symlink lock needs NFS semantics).
        lock = JournalFileOpenLock(str(path))
        check_journal(path, lock)
        backend = RepairingJournalBackend(str(path), lock, before_append=drop_torn_tail)
        return optuna.storages.JournalStorage(backend)
    # RDB (PostgreSQL, MySQL, SQLite): pool_pre_ping survives server restarts.
    if is_database_uri(url):
        check_database(url, "Optuna storage")  # fast, clear failure instead of a traceback
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def check_journal(path: Path, lock) -> None:
    """A journal whose last record was cut by a crash (no final newline) is repaired: Optuna
    would append the next record to the torn one and never read the file again. A backup is
    written first. A bad record anywhere else is a :class:`StoreError` saying how to recover.
    (Processes that already have the journal open repair a tail torn later before their own
    next append: :class:`~agelab.study.optuna_compat.RepairingJournalBackend`.)"""
    if not path.is_file():
        return
    if not path.read_bytes().endswith(b"\n"):
        lock.acquire()  # writers hold it while appending: a torn tail now is really torn
        try:
            drop_torn_tail(path)
        finally:
            lock.release()
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            json.loads(line)
        except ValueError:
            raise StoreError(
                f"the Optuna journal {path} is corrupt at line {number} (not a JSON record). "
                f"Restore a backup of it, or move it aside (mv {path} {path}.corrupt) and run "
                "again: every study in it starts over in Optuna, and `agelab run` / "
                "`agelab check` set their old MLflow runs aside instead of mixing them in"
            ) from None


def drop_torn_tail(path: Path) -> None:
    """Cut a last record that has no final newline (a write cut short by a crash or a full
    disk), after a backup. The caller holds the journal's writer lock."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    backup = _backup(path)
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as fh:
        fh.truncate(keep)
    print(
        f"repaired the Optuna journal {path}: dropped a record cut short by a crash "
        f"({len(data) - keep} bytes; backup: {backup})"
    )


def _backup(path: Path) -> Path:
    backup = path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.copy2(path, backup)
    return backup


@contextlib.contextmanager
def plan_lock(cfg: StudyConfig) -> Iterator[None]:
    """Serialise planning/recovery among processes on this machine (many machines: plan
    once with ``agelab run``, then start the others with ``--join``)."""
    lock_path = cfg.tracking.root / "optuna" / f"{cfg.name}.plan.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    if cfg.search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.search.sampler_seed)
    # grid and random trials are all enqueued with fixed params (see plan.plan()), so this
    # sampler never draws. Optuna's GridSampler is not used: under parallel workers it
    # can repeat cells, and its after_trial raises KeyError on a one-point grid.
    return optuna.samplers.RandomSampler(seed=cfg.search.sampler_seed)


def _pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    if cfg.search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2)
    if cfg.search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs)
    return optuna.pruners.NopPruner()


def open_study(cfg: StudyConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    for attempt in range(5):  # two workers may race to create the study
        try:
            return optuna.create_study(
                storage=storage,
                study_name=cfg.name,
                direction="minimize",
                sampler=_sampler(cfg),
                pruner=_pruner(cfg),
                load_if_exists=True,
            )
        except optuna.exceptions.DuplicatedStudyError:
            time.sleep(0.2 * (attempt + 1))
    raise StoreError(f"could not open Optuna study {cfg.name!r}: another process keeps creating it")


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state name (every state listed, zeros included)."""
    out = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out

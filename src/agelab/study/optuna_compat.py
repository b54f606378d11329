"""The three things agelab needs from Optuna that its public API does not offer.

Everything else in :mod:`agelab.study` uses Optuna's public API. These rely on private
names, pinned by ``tests/test_study_plan.py::test_optuna_private_api_agelab_relies_on`` so
that an Optuna upgrade that changes them fails there, not in the middle of a study.

* Taking a *planned* trial: ``Study.ask()`` pops a WAITING (enqueued) trial when there is
  one, but otherwise creates a new, unplanned trial; a worker of a grid must stop instead.
  ``Study._pop_waiting_trial_id`` is the atomic WAITING→RUNNING step inside ``ask``.
* Annotating a trial this process does not own (the trial of a dead worker, found by
  recovery): ``Trial.set_user_attr`` needs a live ``Trial``, which another process holds.
* Appending to a journal whose last record a crash cut short: Optuna would glue the next
  record onto the torn one, and the file could never be read again. The repair must happen
  under the journal's writer lock, inside ``append_logs``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file


def pop_waiting_trial(study: optuna.Study) -> optuna.Trial | None:
    """Take one enqueued trial (atomic WAITING→RUNNING in every storage), or None when the
    queue is empty: never creates an unplanned trial, unlike ``study.ask()``."""
    trial_id = study._pop_waiting_trial_id()
    return None if trial_id is None else optuna.Trial(study, trial_id)


def set_user_attr(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, key: str, value: Any
) -> None:
    """``trial.set_user_attr(key, value)`` for a trial held by another (dead) process.

    Raises ``optuna.exceptions.UpdateFinishedTrialError`` if it finished meanwhile."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


class RepairingJournalBackend(JournalFileBackend):
    """Optuna's journal file backend, calling ``before_append(path)`` under the writer lock
    before each append (agelab drops a torn tail there). The body is Optuna's own
    ``append_logs`` (5.0); it relies on ``_file_path``, ``_lock`` and ``get_lock_file``."""

    def __init__(self, path: str, lock, before_append: Callable[[Path], None]) -> None:
        super().__init__(path, lock_obj=lock)
        self._before_append = before_append

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with get_lock_file(self._lock):
            self._before_append(Path(self._file_path))
            text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
            with open(self._file_path, "ab") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())

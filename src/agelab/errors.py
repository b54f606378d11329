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


class UserError(Exception):
    """A problem the user can fix; the message names the file/field/URI and what to do."""


class ConfigError(UserError, ValueError):
    """A study file or override is invalid; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid study config {source}:\n{lines}")


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

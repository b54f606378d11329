"""A worker: takes trials of one study and runs each through the objective, in this process.

Order of writes for a trial: final metrics → Optuna ``tell`` → MLflow run FINISHED. A crash
anywhere in between is repaired by :func:`agelab.study.plan.recover` on the next invocation,
so no run is left RUNNING. Failures are recorded on both stores, never raised (except
Ctrl-C, which puts the trial's cell back in the queue and stops).

``python -m agelab.study CONFIG.json PARENT_RUN TAG [MAX_TRIALS]`` (see ``__main__.py``) runs
:func:`worker_main`: the worker processes that :func:`agelab.study.run.run_study` starts for
``--workers N``.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from agelab.config import StudyConfig, flatten
from agelab.errors import StoreError, TrialFailed, UserError, transient_cause
from agelab.faults import kill_point
from agelab.metrics import LAPLACE_CS_AT_MAE, NORMAL_CS_AT_MAE
from agelab.secrets import mask_uri
from agelab.study import optuna_compat
from agelab.study.identity import S_HASH
from agelab.study.plan import (
    A_BEAT,
    A_CELL,
    A_CONFIG,
    A_HOST,
    A_KEY,
    A_PID,
    A_REASON,
    A_RUN,
    BEAT_EVERY_S,
    ERROR_PREFIX,
    INTERRUPTED_PREFIX,
    REQUEUED,
    SEED_PARAM,
    STOPPED_PREFIX,
    cell_id,
    distributions,
    enqueue,
    invalid_trials,
    plan_key,
    trial_config,
    trial_params,
    valid_complete,
)
from agelab.study.store import open_storage, open_study, storage_url
from agelab.tracking import (
    FAILED,
    FINISHED,
    KILLED,
    TAG_KIND,
    TAG_REASON,
    TAG_STATE,
    TAG_STUDY,
    TAG_TRIAL,
    Tracker,
)


@dataclass
class TrialOutcome:
    number: int
    state: str
    value: float | None
    seconds: float
    label: str
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""


def _requeued(t: optuna.trial.FrozenTrial) -> bool:
    """Failed from outside (dead worker, stopped store, Ctrl-C): the work is redone."""
    return t.state == TrialState.FAIL and t.user_attrs.get(A_REASON, "").startswith(REQUEUED)


def run_label(params: dict[str, Any], cfg: StudyConfig) -> str:
    """A name a person can read: ``resnet18 · group · tanh · seed 0`` (+ other params)."""
    backbone = params.get("model.backbone", cfg.model.backbone)
    norm = params.get("model.norm", cfg.model.norm)
    act = params.get("model.act", cfg.model.act)
    rest = [
        f"{k.split('.')[-1]} {_fmt(v)}"
        for k, v in sorted(params.items())
        if k not in ("model.backbone", "model.norm", "model.act", SEED_PARAM)
    ]
    return " · ".join([backbone, norm, act, *rest, f"seed {params.get(SEED_PARAM, 0)}"])


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class Heartbeat:
    """Refreshes a running trial's heartbeat every ``BEAT_EVERY_S`` seconds from a thread,
    for as long as the ``with`` block runs: however long one epoch, the data loading or the
    final evaluation takes, another machine never takes this live worker for a dead one
    (it can only judge by the heartbeat: pids mean nothing across hosts). A write that fails
    is left to the next beat: the trial's own thread meets a failing store itself."""

    def __init__(self, trial: optuna.Trial, every: float | None = None) -> None:
        self.trial = trial
        self.every = BEAT_EVERY_S if every is None else every
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"agelab-heartbeat-{trial.number}", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)  # a write in flight ends first: none lands after tell

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.trial.set_user_attr(A_BEAT, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # finished (or recovered by another process): nothing to keep alive
            except Exception:  # the store may be down: the trial itself will say so
                continue


@dataclass
class _Running:
    """One trial in flight: what every step of :meth:`Worker.run_trial` needs."""

    trial: optuna.Trial
    params: dict[str, Any]
    label: str
    run_id: str
    t0: float

    def outcome(self, state: str, value: float | None = None, **kw: Any) -> TrialOutcome:
        seconds = time.time() - self.t0
        return TrialOutcome(self.trial.number, state, value, seconds, self.label, **kw)


class Worker:
    """Runs trials of one study in this process."""

    def __init__(self, cfg: StudyConfig, parent_run_id: str, *, quiet: bool = False, tag: str = ""):
        self.cfg = cfg
        self.quiet = quiet
        self.tag = tag
        self.storage_url = storage_url(cfg)
        self.study = open_study(cfg, open_storage(self.storage_url))
        self.tracker = Tracker(cfg.tracking, cfg.tracking.experiment or cfg.name)
        self.parent_run_id = parent_run_id
        self._run_id: str | None = None  # the MLflow run of the trial in flight
        self._told = False  # Optuna has the trial's result
        # The identity the study is bound to (see agelab.study.identity): on every trial and run.
        self.config_hash = str(self.study.user_attrs.get(S_HASH, ""))
        self._dataset: tuple[str, Any] | None = None  # one dataset resident at a time

    # ------------------------------------------------------------------ the loop
    def loop(
        self, max_trials: int | None = None, on_done: Callable[[TrialOutcome], None] | None = None
    ) -> list[TrialOutcome]:
        outcomes: list[TrialOutcome] = []
        while max_trials is None or len(outcomes) < max_trials:
            trial = self.next_trial()
            if trial is None:
                break
            outcome = self.run_trial(trial)
            outcomes.append(outcome)
            if on_done:
                on_done(outcome)
        return outcomes

    def next_trial(self) -> optuna.Trial | None:
        """A planned trial from the queue (grid, random), or a new TPE trial while the
        study has fewer than ``search.n_trials`` started (trials of dead workers don't count)."""
        if self.cfg.search.sampler in ("grid", "random"):
            return optuna_compat.pop_waiting_trial(self.study)
        invalid = invalid_trials(self.study)
        started = [
            t
            for t in self.study.get_trials(deepcopy=False)
            if t.number not in invalid
            and not (
                t.state == TrialState.FAIL and t.user_attrs.get(A_REASON, "").startswith(REQUEUED)
            )
        ]
        if len(started) >= int(self.cfg.search.n_trials or 0):
            return None
        return self.study.ask(distributions(self.cfg))

    # ----------------------------------------------------------------- one trial
    def run_trial(self, trial: optuna.Trial) -> TrialOutcome:
        """Suggest → build → fit → evaluate → track. The trial's own failures are recorded,
        not raised. Two things stop the worker instead, leaving the cell to be run again:
        Ctrl-C, and a failure of the machine or a store (full disk, I/O error, read-only
        store, lost database), raised as one :class:`StoreError` line."""
        self._told = False
        try:
            return self._run_trial(trial)
        except Exception as exc:
            cause = transient_cause(exc)
            if cause is None:
                raise
            if not self._told:  # after Optuna has the result, the next run closes the run
                self._stopped(trial, cause)
            raise StoreError(
                f"stopped by the machine or a store, not by the trial: {cause}. Fix that (free "
                "space, fix permissions, restart the database), then run the same command "
                "again: the stopped trial is redone"
            ) from None

    def _run_trial(self, trial: optuna.Trial) -> TrialOutcome:
        from agelab.objective import evaluate_trial

        self._run_id = None
        t0 = time.time()
        for key, value in ((A_HOST, socket.gethostname()), (A_PID, os.getpid()), (A_BEAT, t0)):
            trial.set_user_attr(key, value)
        params = trial_params(trial, self.cfg)
        trial.set_user_attr(A_KEY, plan_key(params))
        trial.set_user_attr(A_CELL, cell_id(params))
        trial.set_user_attr(A_CONFIG, self.config_hash)
        cfg_t = trial_config(self.cfg, params)
        label = run_label(params, self.cfg)
        run = _Running(trial, params, label, self._start_run(trial, params, cfg_t, label), t0)
        try:
            with Heartbeat(trial):  # stopped before the trial is told, whatever happens
                data = self.dataset(cfg_t)
                on_epoch = self._on_epoch(run)
                result = evaluate_trial(
                    cfg_t,
                    data,
                    self.tracker,
                    run.run_id,
                    on_epoch,
                    quiet=self.quiet,
                    keep_model=self._keep_model(params),
                )
        except optuna.TrialPruned as exc:
            return self._report(self._pruned(run, str(exc)))
        except KeyboardInterrupt:
            self._interrupted(run)
            raise
        except Exception as exc:  # diverged, out of memory, bad combination: record, go on
            if transient_cause(exc):
                raise  # not the trial's fault: run_trial stops the worker
            return self._report(self._failed(run, exc))
        kill_point("study.tell.before")
        self.study.tell(trial, result.value)
        self._told = True
        kill_point("study.tell.after")
        self._close(run, "COMPLETE", FINISHED)
        return self._report(run.outcome("COMPLETE", result.value, metrics=result.metrics))

    def _start_run(
        self, trial: optuna.Trial, params: dict[str, Any], cfg_t: StudyConfig, label: str
    ) -> str:
        """The trial's nested MLflow run, tagged with its study, trial and cell."""
        run_id = self.tracker.start_run(
            label,
            parent_id=self.parent_run_id,
            tags={
                TAG_KIND: "trial",
                TAG_STUDY: self.cfg.name,
                TAG_TRIAL: trial.number,
                "agelab.cell": cell_id(params),
                "agelab.replicate": params[SEED_PARAM],
                "agelab.plan_key": plan_key(params),
                "agelab.config_hash": self.config_hash,
                "optuna.study_name": self.study.study_name,
                "optuna.trial_number": trial.number,
                "optuna.storage": mask_uri(self.storage_url),
            },
            system_metrics=self.cfg.tracking.system_metrics,
        )
        self._run_id = run_id
        trial.set_user_attr(A_RUN, run_id)
        self.tracker.log_params(run_id, flatten(cfg_t) | {"trial.seed": params[SEED_PARAM]})
        return run_id

    def _keep_model(self, params: dict[str, Any]) -> Callable[[float], bool]:
        """Whether this trial logs its MLflow Model, asked once its calib MAE is known
        (``tracking.log_model``): ``all``, ``none``, or ``best``: when it beats (strictly)
        every COMPLETE replicate of its cell so far, so each cell's best replicate has one."""
        policy, cell = self.cfg.tracking.log_model, cell_id(params)

        def keep(calib_mae: float) -> bool:
            if policy != "best":
                return policy == "all"
            earlier = [
                t.value
                for t in valid_complete(self.study)
                if t.user_attrs.get(A_CELL) == cell and t.value is not None
            ]
            return math.isfinite(calib_mae) and all(calib_mae < v for v in earlier)

        return keep

    def _on_epoch(self, run: _Running) -> Callable[[int, dict[str, float]], None]:
        """Per epoch: metrics to MLflow, a heartbeat, and Optuna's pruning decision."""

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            self.tracker.log_metrics(run.run_id, metrics, step=epoch)
            run.trial.set_user_attr(A_BEAT, time.time())
            if "calib_mae" in metrics and math.isfinite(metrics["calib_mae"]):
                run.trial.report(metrics["calib_mae"], epoch)
                if run.trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        return on_epoch

    def _close(self, run: _Running, state: str, status: str, reason: str | None = None) -> None:
        tags = {TAG_STATE: state} | ({TAG_REASON: reason} if reason is not None else {})
        self.tracker.set_tags(run.run_id, tags)
        self.tracker.end_run(run.run_id, status)

    def _pruned(self, run: _Running, reason: str) -> TrialOutcome:
        self.tracker.set_tags(run.run_id, {TAG_STATE: "PRUNED", TAG_REASON: reason})
        self.study.tell(run.trial, state=TrialState.PRUNED)
        self.tracker.end_run(run.run_id, KILLED)
        return run.outcome("PRUNED", reason=reason)

    def _interrupted(self, run: _Running) -> None:
        """Ctrl-C: fail this trial and put its cell back in the queue (resumable study)."""
        reason = f"{INTERRUPTED_PREFIX} (Ctrl-C)"
        run.trial.set_user_attr(A_REASON, reason)
        self.study.tell(run.trial, state=TrialState.FAIL)
        if self.cfg.search.sampler in ("grid", "random"):
            enqueue(self.study, run.params, self.config_hash)
        self._close(run, "FAIL", KILLED, reason)

    def _stopped(self, trial: optuna.Trial, cause: str) -> None:
        """Best effort, as the store may be what failed: fail the trial with a reason that
        gets its cell planned again, and close its run. What cannot be written now is
        repaired by the next run's recovery (this process will be dead by then)."""
        reason = f"{STOPPED_PREFIX} {cause}"[:1000]
        with contextlib.suppress(Exception):
            trial.set_user_attr(A_REASON, reason)
            self.study.tell(trial, state=TrialState.FAIL)
        if self._run_id is not None:  # KILLED: an attempt cut short, not the cell's failure
            with contextlib.suppress(Exception):
                self.tracker.set_tags(self._run_id, {TAG_STATE: "FAIL", TAG_REASON: reason})
                self.tracker.end_run(self._run_id, KILLED)

    def _failed(self, run: _Running, exc: Exception) -> TrialOutcome:
        reason = f"{ERROR_PREFIX} {type(exc).__name__}: {exc}"[:1000]
        if not isinstance(exc, TrialFailed):
            traceback.print_exc()
        run.trial.set_user_attr(A_REASON, reason)
        self.study.tell(run.trial, state=TrialState.FAIL)
        self._close(run, "FAIL", FAILED, reason)
        return run.outcome("FAIL", reason=reason)

    # ------------------------------------------------------------------- helpers
    def dataset(self, cfg: StudyConfig):
        """The trial's dataset; the last one stays resident for the next trial that shares
        its data config (one at a time)."""
        from agelab.data.load import load_dataset

        key = cfg.data.model_dump_json()
        if self._dataset is None or self._dataset[0] != key:
            self._dataset = None  # free the previous one before loading the next
            self._dataset = (key, load_dataset(cfg.data, progress=not self.quiet))
        return self._dataset[1]

    def _report(self, o: TrialOutcome) -> TrialOutcome:
        """One line per trial on stdout."""
        if o.state == "COMPLETE":
            m = o.metrics
            line = (
                f"calib MAE {o.value:6.2f} | test MAE {m.get('mae', math.nan):6.2f} | "
                f"within MAE {m.get('coverage_at_mae', math.nan):5.1%} "
                f"(normal {m.get('coverage_at_mae_normal', NORMAL_CS_AT_MAE):.1%}, "
                f"Laplace {m.get('coverage_at_mae_laplace', LAPLACE_CS_AT_MAE):.1%}) | "
                f"within 5y {m.get('coverage_at_5', math.nan):5.1%}"
            )
        else:
            line = f"{o.state}: {o.reason}"
        try:
            print(
                f"{self.tag}trial {o.number:3d} {o.label:<38s} {line} | {o.seconds:5.0f}s",
                flush=True,
            )
        except BrokenPipeError:  # `agelab run … | head`: the results are in the stores
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
        return o


def worker_main(argv: list[str]) -> int:
    """Entry of a worker process started by :func:`agelab.study.run.run_study`."""
    cfg_path, parent, tag = argv[0], argv[1], argv[2]
    max_trials = int(argv[3]) if len(argv) > 3 else None
    cfg = StudyConfig.model_validate_json(Path(cfg_path).read_text())
    threads = int(os.environ.get("AGELAB_WORKER_THREADS", "0"))
    if threads and cfg.train.threads is None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": threads})})
    # Per-epoch bars of parallel workers would garble each other: each worker prints one
    # line per trial instead (prefixed with its tag).
    try:
        Worker(cfg, parent, quiet=True, tag=f"[{tag}] ").loop(max_trials)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:  # a stopped store, say: one line, like the agelab command
        print(f"[{tag}] agelab: {mask_uri(exc)}", file=sys.stderr, flush=True)
        return 2
    return 0

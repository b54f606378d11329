"""Studies: Optuna drives the search, every trial is tracked in MLflow.

The only module that imports optuna. Three ideas keep a study exact under parallel
workers and crashes:

* **Planned trials.** For ``grid`` and ``random`` samplers every trial (a cell × a
  replicate seed) is decided up front and enqueued in the Optuna study. Workers take
  trials from that queue with Optuna's atomic WAITING→RUNNING transition, so no cell runs
  twice, on one machine or many. (Optuna's ``GridSampler`` alone may repeat cells under
  parallel workers; its own docs say so.) ``tpe`` is adaptive and asks as it goes.
* **Liveness.** A running trial carries its worker's host, pid and a heartbeat refreshed
  every epoch. Before planning, a trial whose worker is gone (same host and pid dead, or no
  heartbeat for ``stale_after`` seconds) is marked FAIL, its MLflow run closed as KILLED
  and its cell put back in the queue.
* **Order of writes.** final metrics → Optuna ``tell`` → MLflow run FINISHED; any crash in
  between is repaired by the recovery above, so no run is left RUNNING.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from agelab.config import Range, StudyConfig, estimate_trial_seconds, flatten, size_warning
from agelab.faults import kill_point
from agelab.tracking import (
    FAILED,
    FINISHED,
    KILLED,
    TAG_KIND,
    TAG_REASON,
    TAG_STATE,
    TAG_STUDY,
    TAG_TRIAL,
    TAG_WORKER_HOST,
    TAG_WORKER_PID,
    Tracker,
    bind_allowed,
    check_database,
    git_commit,
    is_database_uri,
    mask_uri,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SEED_PARAM = "seed"
STALE_AFTER_S = float(os.environ.get("AGELAB_STALE_AFTER", "900"))
# Trial user attributes.
A_KEY, A_CELL, A_HOST, A_PID, A_BEAT = "plan_key", "cell", "host", "pid", "heartbeat"
A_RUN, A_REASON = "mlflow_run_id", "fail_reason"


# --------------------------------------------------------------------------- storage


def storage_url(cfg: StudyConfig) -> str:
    """Optuna storage: config, else $AGELAB_OPTUNA_STORAGE, else a journal file."""
    url = cfg.tracking.storage or os.environ.get("AGELAB_OPTUNA_STORAGE")
    return url or f"journal:{(cfg.tracking.root / 'optuna' / 'journal.log').resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = Path(url[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        # The open-lock works on any local filesystem (the symlink lock needs NFS semantics).
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        return optuna.storages.JournalStorage(backend)
    # RDB (PostgreSQL, MySQL, SQLite): pool_pre_ping survives server restarts.
    if is_database_uri(url):
        check_database(url, "Optuna storage")  # fast, clear failure instead of a traceback
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


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


def open_study(cfg: StudyConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    sampler: optuna.samplers.BaseSampler
    if cfg.search.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=cfg.search.sampler_seed)
    else:
        # grid and random trials are all enqueued with fixed params (see plan()), so this
        # sampler never draws. Optuna's GridSampler is not used: under parallel workers it
        # can repeat cells, and its after_trial raises KeyError on a one-point grid.
        sampler = optuna.samplers.RandomSampler(seed=cfg.search.sampler_seed)
    pruner: optuna.pruners.BasePruner = {
        "none": optuna.pruners.NopPruner(),
        "median": optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2),
        "hyperband": optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs),
    }[cfg.search.pruner]
    for attempt in range(5):  # two workers may race to create the study
        try:
            return optuna.create_study(
                storage=storage,
                study_name=cfg.name,
                direction="minimize",
                sampler=sampler,
                pruner=pruner,
                load_if_exists=True,
            )
        except optuna.exceptions.DuplicatedStudyError:
            time.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"could not open Optuna study {cfg.name!r}")


# ------------------------------------------------------------------------- planning


def distributions(cfg: StudyConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    out = space_distributions(cfg.search.space)
    out[SEED_PARAM] = optuna.distributions.CategoricalDistribution(list(cfg.search.seeds))
    return out


def space_distributions(
    space: dict[str, list[Any] | Range],
) -> dict[str, optuna.distributions.BaseDistribution]:
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, choices in space.items():
        if isinstance(choices, Range):
            if choices.int:
                out[key] = optuna.distributions.IntDistribution(
                    int(choices.low), int(choices.high), log=choices.log
                )
            else:
                out[key] = optuna.distributions.FloatDistribution(
                    choices.low, choices.high, log=choices.log
                )
        else:
            out[key] = optuna.distributions.CategoricalDistribution(choices)
    return out


def param_importances(
    space: dict[str, Any], params: list[dict[str, Any]], values: list[float], seed: int = 0
) -> dict[str, float] | None:
    """fANOVA importances of the searched parameters for ``values`` (e.g. test MAE).

    Built on an in-memory Optuna study of the completed trials, so any response (not only
    the objective the study optimised) can be explained. None when there are too few trials
    or nothing varies.
    """
    dists = space_distributions(
        {k: Range.model_validate(v) if isinstance(v, dict) else v for k, v in space.items()}
    )
    study = optuna.create_study()
    for p, v in zip(params, values, strict=True):
        if not math.isfinite(v):
            continue
        with contextlib.suppress(ValueError):  # a value outside the space: skip the row
            study.add_trial(
                optuna.trial.create_trial(
                    params={k: _coerce(d, p[k]) for k, d in dists.items()},
                    distributions=dists,
                    value=v,
                )
            )
    if len(study.trials) < 3:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)
            )
    except (RuntimeError, ValueError):
        return None
    return {k: float(v) for k, v in result.items()}


def _coerce(dist: optuna.distributions.BaseDistribution, value: Any) -> Any:
    if isinstance(dist, optuna.distributions.IntDistribution):
        return round(float(value))
    if isinstance(dist, optuna.distributions.FloatDistribution):
        return float(value)
    return value


def cell_id(params: dict[str, Any]) -> str:
    """A cell: one point of the space, all replicate seeds together."""
    return " | ".join(f"{k}={params[k]}" for k in sorted(params) if k != SEED_PARAM)


def plan_key(params: dict[str, Any]) -> str:
    return f"{cell_id(params)} | seed={params[SEED_PARAM]}"


def planned_trials(cfg: StudyConfig) -> list[dict[str, Any]]:
    """Every trial of a grid or random study, in a fixed order (cells × seeds)."""
    keys = list(cfg.search.space)
    if cfg.search.sampler == "grid":
        points = [
            dict(zip(keys, values, strict=True))
            for values in itertools.product(*(cfg.search.space[k] for k in keys))
        ]
    elif cfg.search.sampler == "random":
        # Draw the configurations with Optuna's own seeded RandomSampler in memory, so the
        # same seed gives the same plan on every machine.
        dists = {k: v for k, v in distributions(cfg).items() if k != SEED_PARAM}
        draft = optuna.create_study(sampler=optuna.samplers.RandomSampler(cfg.search.sampler_seed))
        points = []
        for _ in range(int(cfg.search.n_trials or 0)):
            trial = draft.ask(dists)
            points.append(dict(trial.params))
            draft.tell(trial, 0.0)
    else:
        return []
    return [p | {SEED_PARAM: s} for p in points for s in cfg.search.seeds]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) is dead for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def is_stale(trial: optuna.trial.FrozenTrial, now: float | None = None) -> bool:
    attrs = trial.user_attrs
    now = time.time() if now is None else now
    beat = float(
        attrs.get(A_BEAT, trial.datetime_start.timestamp() if trial.datetime_start else now)
    )
    if attrs.get(A_HOST) == socket.gethostname() and A_PID in attrs:
        return not _pid_alive(int(attrs[A_PID])) or now - beat > STALE_AFTER_S
    return now - beat > STALE_AFTER_S


def recover(study: optuna.Study, tracker: Tracker) -> int:
    """Fail trials whose worker died, close their runs, re-queue their cells."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(t):
            continue
        reason = f"worker died (host {t.user_attrs.get(A_HOST)}, pid {t.user_attrs.get(A_PID)})"
        study._storage.set_trial_user_attr(t._trial_id, A_REASON, reason)
        try:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished meanwhile
        run_id = t.user_attrs.get(A_RUN)
        if run_id:
            tracker.set_tags(run_id, {TAG_STATE: "FAIL", TAG_REASON: reason})
            tracker.end_run(run_id, KILLED)
        n += 1
    # MLflow runs whose process is gone (killed before the trial knew its run id, or the
    # parent run of a dead invocation): finished if their trial completed, else killed.
    complete = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    host = socket.gethostname()
    for run in tracker.running_runs():
        tags = run.data.tags
        pid = tags.get(TAG_WORKER_PID)
        if tags.get(TAG_WORKER_HOST) != host or pid is None or _pid_alive(int(pid)):
            continue
        trial_no = tags.get(TAG_TRIAL)
        done = trial_no is not None and int(trial_no) in complete
        if done:  # killed between Optuna's tell and closing the run
            tracker.set_tags(run.info.run_id, {TAG_STATE: "COMPLETE"})
        tracker.end_run(run.info.run_id, FINISHED if done else KILLED)
    return n


def plan(study: optuna.Study, cfg: StudyConfig) -> int:
    """Enqueue the planned trials that are not done, queued or running. Returns count."""
    taken = {
        t.user_attrs.get(A_KEY)
        for t in study.get_trials(deepcopy=False)
        if t.state
        in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING, TrialState.RUNNING)
        or (t.state == TrialState.FAIL and t.user_attrs.get(A_REASON, "").startswith("error:"))
    }
    added = 0
    for params in planned_trials(cfg):
        key = plan_key(params)
        if key in taken:
            continue
        study.enqueue_trial(params, user_attrs={A_KEY: key, A_CELL: cell_id(params)})
        taken.add(key)
        added += 1
    return added


def pop_planned(study: optuna.Study) -> optuna.Trial | None:
    """Take one queued trial, or None: never creates an unplanned trial (unlike ask())."""
    trial_id = study._pop_waiting_trial_id()  # atomic WAITING→RUNNING in every storage
    return None if trial_id is None else optuna.Trial(study, trial_id)


# ---------------------------------------------------------------------------- trials


@dataclass
class TrialOutcome:
    number: int
    state: str
    value: float | None
    seconds: float
    label: str
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""


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
        self._data_cache: dict[str, Any] = {}

    def next_trial(self) -> optuna.Trial | None:
        if self.cfg.search.sampler in ("grid", "random"):
            return pop_planned(self.study)
        started = [
            t
            for t in self.study.get_trials(deepcopy=False)
            if not (
                t.state == TrialState.FAIL
                and t.user_attrs.get(A_REASON, "").startswith("worker died")
            )
        ]
        if len(started) >= int(self.cfg.search.n_trials or 0):
            return None
        trial = self.study.ask(distributions(self.cfg))
        return trial

    def loop(self, max_trials: int | None = None, on_done=None) -> list[TrialOutcome]:
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

    def _data(self, cfg: StudyConfig):
        from agelab.data import load_dataset

        key = cfg.data.model_dump_json()
        if key not in self._data_cache:
            self._data_cache.clear()  # one dataset resident at a time
            self._data_cache[key] = load_dataset(cfg.data, progress=not self.quiet)
        return self._data_cache[key]

    def _beat(self, trial: optuna.Trial) -> None:
        self.study._storage.set_trial_user_attr(trial._trial_id, A_BEAT, time.time())

    def run_trial(self, trial: optuna.Trial) -> TrialOutcome:
        """Suggest → build → fit → evaluate → track. Failures are recorded, not raised
        (except Ctrl-C, which re-queues the trial's cell and stops)."""
        from agelab.objective import TrialFailed, evaluate_trial

        t0 = time.time()
        storage, tid = self.study._storage, trial._trial_id
        for key, value in (
            (A_HOST, socket.gethostname()),
            (A_PID, os.getpid()),
            (A_BEAT, time.time()),
        ):
            storage.set_trial_user_attr(tid, key, value)
        params = {
            k: trial.suggest_categorical(k, d.choices)
            if isinstance(d, optuna.distributions.CategoricalDistribution)
            else trial._suggest(k, d)
            for k, d in distributions(self.cfg).items()
        }
        key = plan_key(params)
        storage.set_trial_user_attr(tid, A_KEY, key)
        storage.set_trial_user_attr(tid, A_CELL, cell_id(params))
        label = run_label(params, self.cfg)
        overrides = {k: v for k, v in params.items() if k != SEED_PARAM}
        overrides["train.seed"] = params[SEED_PARAM]
        cfg_t = self.cfg.with_params(overrides)
        run_id = self.tracker.start_run(
            label,
            parent_id=self.parent_run_id,
            tags={
                TAG_KIND: "trial",
                TAG_STUDY: self.cfg.name,
                TAG_TRIAL: trial.number,
                "agelab.cell": cell_id(params),
                "agelab.replicate": params[SEED_PARAM],
                "agelab.plan_key": key,
                "optuna.study_name": self.study.study_name,
                "optuna.trial_number": trial.number,
                "optuna.trial_id": tid,
                "optuna.storage": mask_uri(self.storage_url),
            },
        )
        storage.set_trial_user_attr(tid, A_RUN, run_id)
        self.tracker.log_params(run_id, flatten(cfg_t) | {"trial.seed": params[SEED_PARAM]})

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            self.tracker.log_metrics(run_id, metrics, step=epoch)
            self._beat(trial)
            if "calib_mae" in metrics and math.isfinite(metrics["calib_mae"]):
                trial.report(metrics["calib_mae"], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        try:
            result = evaluate_trial(
                cfg_t, self._data(cfg_t), self.tracker, run_id, on_epoch, quiet=self.quiet
            )
        except optuna.TrialPruned as exc:
            self.tracker.set_tags(run_id, {TAG_STATE: "PRUNED", TAG_REASON: str(exc)})
            self.study.tell(trial, state=TrialState.PRUNED)
            self.tracker.end_run(run_id, KILLED)
            return self._report(
                TrialOutcome(trial.number, "PRUNED", None, time.time() - t0, label, reason=str(exc))
            )
        except KeyboardInterrupt:
            # Leave the study resumable: fail this trial and put its cell back in the queue.
            reason = "interrupted (Ctrl-C)"
            storage.set_trial_user_attr(tid, A_REASON, reason)
            self.study.tell(trial, state=TrialState.FAIL)
            if self.cfg.search.sampler in ("grid", "random"):
                self.study.enqueue_trial(params, user_attrs={A_KEY: key, A_CELL: cell_id(params)})
            self.tracker.set_tags(run_id, {TAG_STATE: "FAIL", TAG_REASON: reason})
            self.tracker.end_run(run_id, KILLED)
            raise
        except Exception as exc:  # diverged, out of memory, bad combination: record, go on
            reason = f"error: {type(exc).__name__}: {exc}"[:1000]
            if not isinstance(exc, TrialFailed):
                traceback.print_exc()
            storage.set_trial_user_attr(tid, A_REASON, reason)
            self.study.tell(trial, state=TrialState.FAIL)
            self.tracker.set_tags(run_id, {TAG_STATE: "FAIL", TAG_REASON: reason})
            self.tracker.end_run(run_id, FAILED)
            return self._report(
                TrialOutcome(trial.number, "FAIL", None, time.time() - t0, label, reason=reason)
            )
        kill_point("study.tell.before")
        self.study.tell(trial, result.value)
        kill_point("study.tell.after")
        self.tracker.set_tags(run_id, {TAG_STATE: "COMPLETE"})
        self.tracker.end_run(run_id, FINISHED)
        return self._report(
            TrialOutcome(
                trial.number,
                "COMPLETE",
                result.value,
                time.time() - t0,
                label,
                metrics=result.metrics,
            )
        )

    def _report(self, o: TrialOutcome) -> TrialOutcome:
        if o.state == "COMPLETE":
            m = o.metrics
            line = (
                f"calib MAE {o.value:6.2f} | test MAE {m.get('mae', float('nan')):6.2f} | "
                f"within MAE {m.get('coverage_at_mae', float('nan')):5.1%} "
                f"(normal {m.get('coverage_at_mae_normal', 0.5751):.1%}, "
                f"Laplace {m.get('coverage_at_mae_laplace', 0.6321):.1%}) | "
                f"within 5y {m.get('coverage_at_5', float('nan')):5.1%}"
            )
        else:
            line = f"{o.state}: {o.reason}"
        print(
            f"{self.tag}trial {o.number:3d} {o.label:<38s} {line} | {o.seconds:5.0f}s", flush=True
        )
        return o


# ----------------------------------------------------------------------- invocation


@dataclass
class StudySummary:
    study_name: str
    parent_run_id: str
    counts: dict[str, int]
    planned: int
    ok: bool
    best: dict[str, Any] | None = None


def config_hash(cfg: StudyConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12]


def _versions() -> dict[str, str]:
    import timm
    import torch

    from agelab import __version__

    return {
        "agelab.version": __version__,
        "torch.version": torch.__version__,
        "timm.version": timm.__version__,
        "optuna.version": optuna.__version__,
    }


def _device_name(cfg: StudyConfig) -> str:
    import torch

    if cfg.train.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def seconds_per_trial(cfg: StudyConfig, study: optuna.Study) -> tuple[float, str]:
    """Mean duration of this study's completed trials, else a rough estimate."""
    done = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.datetime_start and t.datetime_complete
    ]
    if done:
        return sum(done) / len(done), f"measured over the {len(done)} trial(s) done so far"
    import torch

    gpu = cfg.train.device != "cpu" and torch.cuda.is_available()
    return estimate_trial_seconds(cfg, gpu=gpu)


def counts(study: optuna.Study) -> dict[str, int]:
    out = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out


def run_study(
    cfg: StudyConfig,
    *,
    workers: int = 1,
    n_trials: int | None = None,
    join: bool = False,
    quiet: bool = False,
) -> StudySummary:
    """Plan (or join) a study, run its trials in ``workers`` processes, summarise."""
    from agelab.data import load_dataset

    t0 = time.time()
    tracker = Tracker(cfg.tracking, cfg.tracking.experiment or cfg.name)
    url = storage_url(cfg)
    study = open_study(cfg, open_storage(url))
    total = cfg.search.n_total()
    if total > cfg.search.warn_cells:
        print(size_warning(cfg, *seconds_per_trial(cfg, study)))
    if not join:
        with plan_lock(cfg):
            recovered = recover(study, tracker)
            added = plan(study, cfg)
        if recovered:
            print(f"recovered {recovered} trial(s) left running by a dead worker; re-queued")
        before = counts(study)
        print(
            f"study {cfg.name!r}: {total} planned trial(s), {before['COMPLETE']} complete, "
            f"{added} newly queued, {before['WAITING']} waiting "
            f"(optuna {mask_uri(url)}, mlflow {mask_uri(tracker.uri)})"
        )
    # Build (or load) the data once before any worker starts, so workers hit the cache.
    data = load_dataset(cfg.data, progress=not quiet)
    parent = tracker.start_run(
        f"{cfg.name} · {time.strftime('%Y-%m-%d %H:%M')}",
        tags={
            TAG_KIND: "study",
            TAG_STUDY: cfg.name,
            "agelab.sampler": cfg.search.sampler,
            "agelab.config_hash": config_hash(cfg),
            "agelab.git_commit": git_commit(),
            "agelab.dataset_fingerprint": data.fingerprint,
            "agelab.device": _device_name(cfg),
            "agelab.workers": workers,
            "optuna.study_name": cfg.name,
            "optuna.storage": mask_uri(url),
            "mlflow.note.content": cfg.description,
        }
        | _versions(),
    )
    tracker.log_params(
        parent,
        flatten(cfg)
        | {
            "search.space": json.dumps(
                {
                    k: (v.model_dump() if isinstance(v, Range) else v)
                    for k, v in cfg.search.space.items()
                }
            )
        },
    )
    del data
    status = FINISHED
    try:
        if workers <= 1:
            _run_inline(cfg, parent, n_trials, quiet, total)
        else:
            _run_processes(cfg, parent, workers, n_trials)
    except KeyboardInterrupt:
        status = KILLED
        print("\nstopped: the study is resumable — run the same command again to continue")
        raise
    finally:
        final = counts(study)
        tracker.log_metrics(
            parent,
            {f"trials_{k.lower()}": v for k, v in final.items()}
            | {"study_seconds": time.time() - t0},
        )
        tracker.end_run(parent, status)
    summary = StudySummary(cfg.name, parent, final, total, ok=final["RUNNING"] == 0)
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if done:
        best = min(done, key=lambda t: t.value)
        summary.best = {"number": best.number, "calib_mae": best.value, "params": best.params}
    _print_summary(cfg, summary, tracker, time.time() - t0)
    if cfg.report.auto and final["COMPLETE"]:
        _auto_report(cfg)
    return summary


def _auto_report(cfg: StudyConfig) -> None:
    """The ablation report of the study so far; a failure here never fails the study."""
    from agelab.report import report_for_config

    try:
        result = report_for_config(cfg)
    except Exception as exc:
        print(
            f"warning: the ablation report failed ({type(exc).__name__}: {exc}); the runs are "
            f"safe — retry with: agelab report <study file> (study {cfg.name!r})"
        )
        return
    print(f"\nVerdict ({result.html}):")
    for sentence in result.analysis.verdict:
        print(f"  - {sentence}")


def _run_inline(
    cfg: StudyConfig, parent: str, n_trials: int | None, quiet: bool, total: int
) -> None:
    from tqdm import tqdm

    worker = Worker(cfg, parent, quiet=quiet)
    done0 = sum(
        1
        for t in worker.study.get_trials(deepcopy=False)
        if t.state.is_finished() and t.state != TrialState.FAIL
    )
    with tqdm(
        total=total,
        initial=min(done0, total),
        desc=cfg.name,
        unit="trial",
        disable=quiet,
        position=0,
        leave=True,
        dynamic_ncols=True,
    ) as bar:
        worker.loop(n_trials, on_done=lambda o: bar.update(1))


def _run_processes(cfg: StudyConfig, parent: str, workers: int, n_trials: int | None) -> None:
    """N worker processes on this machine; Ctrl-C reaches them all (same process group)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        fh.write(cfg.model_dump_json())
        cfg_path = fh.name
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "AGELAB_WORKER_THREADS": str(threads)}
    procs = []
    try:
        for i in range(workers):
            cmd = [sys.executable, "-m", "agelab.study", cfg_path, parent, f"w{i}"]
            if n_trials is not None:
                cmd.append(str(max(1, math.ceil(n_trials / workers))))
            procs.append(subprocess.Popen(cmd, env=env))
        rcs = [p.wait() for p in procs]
        if any(rcs):
            print(f"warning: worker exit codes {rcs}")
    except KeyboardInterrupt:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    finally:
        os.unlink(cfg_path)


def _print_summary(cfg: StudyConfig, s: StudySummary, tracker: Tracker, seconds: float) -> None:
    c = s.counts
    print(
        f"\nstudy {cfg.name!r} done in {seconds / 60:.1f} min: {c['COMPLETE']} complete, "
        f"{c['PRUNED']} pruned, {c['FAIL']} failed, {c['WAITING']} waiting "
        f"(of {s.planned} planned)"
    )
    if s.best:
        print(
            f"best by calib MAE: trial {s.best['number']} ({s.best['calib_mae']:.2f} years) "
            f"{s.best['params']}"
        )
    print(
        f"MLflow experiment {tracker.experiment_name!r} (id {tracker.experiment_id}), "
        f"parent run {s.parent_run_id}"
    )
    print("browse it: make ui   →  http://127.0.0.1:5000")


def serve_dashboard(*, host: str, port: int, root: Path, storage: str | None, expose: bool) -> int:
    if not bind_allowed(host, expose, "agelab dashboard"):
        return 2
    from agelab.config import StudyConfig as _S

    url = storage or storage_url(_S(name="x", tracking={"root": root}))
    from optuna_dashboard import run_server

    print(f"optuna-dashboard on http://{host}:{port}  (storage {mask_uri(url)}; Ctrl-C stops)")
    with contextlib.suppress(KeyboardInterrupt):
        run_server(open_storage(url), host=host, port=port)
    return 0


def _worker_main(argv: list[str]) -> int:
    """Entry of a worker process started by :func:`_run_processes`."""
    args = argv
    cfg_path, parent, tag = args[0], args[1], args[2]
    max_trials = int(args[3]) if len(args) > 3 else None
    cfg = StudyConfig.model_validate_json(Path(cfg_path).read_text())
    threads = int(os.environ.get("AGELAB_WORKER_THREADS", "0"))
    if threads and cfg.train.threads is None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": threads})})
    # Per-epoch bars of parallel workers would garble each other: each worker prints one
    # line per trial instead (prefixed with its tag).
    worker = Worker(cfg, parent, quiet=True, tag=f"[{tag}] ")
    try:
        worker.loop(max_trials)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))

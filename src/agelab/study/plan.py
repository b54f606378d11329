"""What a study runs: its trials planned up front, and trials of dead workers re-queued.

For ``grid`` and ``random`` samplers every trial (a cell × a replicate seed) is decided
up front and enqueued in the Optuna study. Workers take trials from that queue with
Optuna's atomic WAITING→RUNNING transition, so no cell runs twice, on one machine or many.
(Optuna's ``GridSampler`` alone may repeat cells under parallel workers; its own docs say
so.) ``tpe`` is adaptive and asks as it goes.

A running trial carries its worker's host, pid and a heartbeat, refreshed every
``BEAT_EVERY_S`` seconds by a thread of the worker while the trial runs (so a long epoch,
data loading or final evaluation never looks like a dead worker) and after every epoch.
Before planning, a trial whose worker is gone is marked FAIL, its MLflow run closed as
KILLED and its cell put back in the queue. Gone means: on this host, its pid is dead (or
its heartbeat stale); on another host, whose pids mean nothing here, no heartbeat for
``STALE_AFTER_S`` seconds (``$AGELAB_STALE_AFTER``, default 900).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections import Counter
from typing import Any

import optuna
from optuna.trial import TrialState

from agelab.config import Range, StudyConfig
from agelab.processes import pid_alive
from agelab.study import optuna_compat
from agelab.study.identity import S_HASH
from agelab.tracking import (
    FINISHED,
    KILLED,
    TAG_REASON,
    TAG_STATE,
    TAG_TRIAL,
    TAG_WORKER_HOST,
    TAG_WORKER_PID,
    Tracker,
)

SEED_PARAM = "seed"
STALE_AFTER_S = float(os.environ.get("AGELAB_STALE_AFTER", "900"))
#: How often a worker refreshes its running trial's heartbeat: well inside the stale timeout.
BEAT_EVERY_S = max(0.1, min(60.0, STALE_AFTER_S / 4))
# Trial user attributes.
A_KEY, A_CELL, A_HOST, A_PID, A_BEAT = "plan_key", "cell", "host", "pid", "heartbeat"
A_RUN, A_REASON = "mlflow_run_id", "fail_reason"
#: The planned params of a grid/random trial (Optuna params would pin each param's choices
#: for the whole study, so a study could not grow), and the identity hash it runs under.
A_PARAMS, A_CONFIG = "params", "config_hash"
#: Study attribute: {trial number: reason} of COMPLETE trials whose result was lost or cannot
#: be trusted (see :mod:`.check`). Their cells are planned again; the trials are kept (Optuna
#: freezes a finished trial's attributes, hence a study attribute).
S_INVALID = "invalid_trials"


def invalid_trials(study: optuna.Study) -> dict[int, str]:
    return {int(k): v for k, v in (study.user_attrs.get(S_INVALID) or {}).items()}


def valid_complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE trials whose results stand (not invalidated by a consistency check)."""
    invalid = invalid_trials(study)
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.number not in invalid
    ]


#: Fail reasons that start with this are the trial's own (it ran and failed): not re-planned.
ERROR_PREFIX = "error:"
#: ... and with this, its worker died: the cell goes back in the queue.
DIED_PREFIX = "worker died"
#: ... and with this, the machine or a store failed under it (full disk, lost database):
#: the cell goes back in the queue too (at most MAX_STOPS times: a trial that fills the disk
#: itself would otherwise stop every run).
STOPPED_PREFIX = "stopped:"
MAX_STOPS = 3
#: ... and with this, Ctrl-C (or SIGTERM) stopped it: re-queued at once.
INTERRUPTED_PREFIX = "interrupted"
#: Fail reasons of trials that did not fail on their own: their cell is run again.
REQUEUED = (DIED_PREFIX, STOPPED_PREFIX, INTERRUPTED_PREFIX)


# ----------------------------------------------------------------------- the space


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


def distributions(cfg: StudyConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    """The searched params and the replicate seed, as Optuna distributions."""
    out = space_distributions(cfg.search.space)
    out[SEED_PARAM] = optuna.distributions.CategoricalDistribution(list(cfg.search.seeds))
    return out


def trial_params(trial: optuna.Trial, cfg: StudyConfig) -> dict[str, Any]:
    """A planned trial's params (from its user attributes); else the sampler's choice."""
    planned = trial.user_attrs.get(A_PARAMS)
    return dict(planned) if planned is not None else suggest(trial, cfg)


def suggest(trial: optuna.Trial, cfg: StudyConfig) -> dict[str, Any]:
    """The trial's params through the public suggest API (a TPE trial gets the sampler's
    choice; an enqueued trial of an older agelab gets its fixed params back)."""
    params: dict[str, Any] = {}
    for key, d in distributions(cfg).items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            params[key] = trial.suggest_categorical(key, d.choices)
        elif isinstance(d, optuna.distributions.IntDistribution):
            params[key] = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
        else:
            params[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
    return params


def cell_id(params: dict[str, Any]) -> str:
    """A cell: one point of the space, all replicate seeds together."""
    return " | ".join(f"{k}={params[k]}" for k in sorted(params) if k != SEED_PARAM)


def plan_key(params: dict[str, Any]) -> str:
    """A planned trial: a cell and one replicate seed."""
    return f"{cell_id(params)} | seed={params[SEED_PARAM]}"


def trial_config(cfg: StudyConfig, params: dict[str, Any]) -> StudyConfig:
    """The study config with one trial's params applied and its replicate seed where
    ``search.replicate_varies`` says: ``train.seed`` (init: weights, batch order,
    augmentation) and/or ``data.split.seed`` (split: the base split seed + the replicate
    seed). Every cell of one replicate gets the same of both, so pairs stay paired."""
    overrides = {k: v for k, v in params.items() if k != SEED_PARAM}
    seed, varies = int(params[SEED_PARAM]), cfg.search.replicate_varies
    if "init" in varies:
        overrides["train.seed"] = seed
    if "split" in varies and "data.split.seed" not in params:
        overrides["data.split.seed"] = (cfg.data.split.seed + seed) % 2**32
    return cfg.with_params(overrides)


# -------------------------------------------------------------------------- planning


def planned_trials(cfg: StudyConfig) -> list[dict[str, Any]]:
    """Every trial of a grid or random study, in a fixed order (cells × seeds)."""
    keys = list(cfg.search.space)
    if cfg.search.sampler == "grid":
        points = [
            dict(zip(keys, values, strict=True))
            for values in itertools.product(*(cfg.search.space[k] for k in keys))
        ]
    elif cfg.search.sampler == "random":
        points = _random_points(cfg)
    else:
        return []
    return [p | {SEED_PARAM: s} for p in points for s in cfg.search.seeds]


def _random_points(cfg: StudyConfig) -> list[dict[str, Any]]:
    # Drawn with Optuna's own seeded RandomSampler in memory, so the same seed gives the
    # same plan on every machine.
    # Keys in sorted order: the same space written in another order draws the same points.
    dists = space_distributions(dict(sorted(cfg.search.space.items())))
    draft = optuna.create_study(sampler=optuna.samplers.RandomSampler(cfg.search.sampler_seed))
    points = []
    for _ in range(int(cfg.search.n_trials or 0)):
        trial = draft.ask(dists)
        points.append(dict(trial.params))
        draft.tell(trial, 0.0)
    return points


def _taken(study: optuna.Study) -> set[str]:
    """Plan keys that need no new trial: done (and valid), queued, running, or failed on
    their own (a deterministic error would fail again)."""
    busy = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING, TrialState.RUNNING)
    invalid = invalid_trials(study)
    trials = study.get_trials(deepcopy=False)
    stops = Counter(
        t.user_attrs.get(A_KEY)
        for t in trials
        if t.state == TrialState.FAIL and t.user_attrs.get(A_REASON, "").startswith(STOPPED_PREFIX)
    )
    return {
        t.user_attrs.get(A_KEY)
        for t in trials
        if (t.state in busy and t.number not in invalid)
        or (t.state == TrialState.FAIL and t.user_attrs.get(A_REASON, "").startswith(ERROR_PREFIX))
    } | {key for key, n in stops.items() if n >= MAX_STOPS}


def enqueue(study: optuna.Study, params: dict[str, Any], config_hash: str) -> None:
    """Queue a planned trial; its params travel as user attributes (see ``A_PARAMS``)."""
    study.enqueue_trial(
        {},
        user_attrs={
            A_KEY: plan_key(params),
            A_CELL: cell_id(params),
            A_PARAMS: params,
            A_CONFIG: config_hash,
        },
    )


def plan(study: optuna.Study, cfg: StudyConfig) -> int:
    """Enqueue the planned trials that are not done, queued or running. Returns count."""
    taken = _taken(study)
    config_hash = str(study.user_attrs.get(S_HASH, ""))
    added = 0
    for params in planned_trials(cfg):
        key = plan_key(params)
        if key in taken:
            continue
        enqueue(study, params, config_hash)
        taken.add(key)
        added += 1
    return added


# -------------------------------------------------------------------------- recovery


def is_stale(trial: optuna.trial.FrozenTrial, now: float | None = None) -> bool:
    attrs = trial.user_attrs
    now = time.time() if now is None else now
    beat = float(
        attrs.get(A_BEAT, trial.datetime_start.timestamp() if trial.datetime_start else now)
    )
    if attrs.get(A_HOST) == socket.gethostname() and A_PID in attrs:
        return not pid_alive(int(attrs[A_PID])) or now - beat > STALE_AFTER_S
    return now - beat > STALE_AFTER_S


def recover(study: optuna.Study, tracker: Tracker) -> int:
    """Fail trials whose worker died, close their runs, re-queue their cells (the next
    :func:`plan` enqueues them again). Returns how many trials were recovered."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_stale(t) and _fail_dead_trial(study, tracker, t):
            n += 1
    _close_orphan_runs(study, tracker)
    return n


def _fail_dead_trial(study: optuna.Study, tracker: Tracker, t: optuna.trial.FrozenTrial) -> bool:
    reason = f"{DIED_PREFIX} (host {t.user_attrs.get(A_HOST)}, pid {t.user_attrs.get(A_PID)})"
    try:
        optuna_compat.set_user_attr(study, t, A_REASON, reason)
        study.tell(t.number, state=TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
        return False  # finished meanwhile
    run_id = t.user_attrs.get(A_RUN)
    if run_id:
        tracker.set_tags(run_id, {TAG_STATE: "FAIL", TAG_REASON: reason})
        tracker.end_run(run_id, KILLED)
    return True


def _close_orphan_runs(study: optuna.Study, tracker: Tracker) -> None:
    """MLflow runs whose process is gone (killed before the trial knew its run id, or the
    parent run of a dead invocation): finished if their trial completed, else killed."""
    complete = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    host = socket.gethostname()
    for run in tracker.running_runs():
        tags = run.data.tags
        pid = tags.get(TAG_WORKER_PID)
        if tags.get(TAG_WORKER_HOST) != host or pid is None or pid_alive(int(pid)):
            continue
        trial_no = tags.get(TAG_TRIAL)
        done = trial_no is not None and int(trial_no) in complete
        if done:  # killed between Optuna's tell and closing the run
            tracker.set_tags(run.info.run_id, {TAG_STATE: "COMPLETE"})
        tracker.end_run(run.info.run_id, FINISHED if done else KILLED)


def completed(study: optuna.Study, cfg: StudyConfig) -> tuple[int, int]:
    """(valid COMPLETE trials of the current plan, those outside it). A grid that dropped a
    level or a seed keeps its old results; they are counted apart, never as progress."""
    done = valid_complete(study)
    keys = {plan_key(p) for p in planned_trials(cfg)}
    if not keys:  # tpe: nothing is planned ahead
        return len(done), 0
    inside = sum(1 for t in done if t.user_attrs.get(A_KEY) in keys)
    return inside, len(done) - inside

"""Studies: Optuna drives the search, every trial is tracked in MLflow.

The only package that imports optuna. Three ideas keep a study exact under parallel workers
and crashes:

* **Planned trials** (:mod:`.plan`). For ``grid`` and ``random`` samplers every trial (a
  cell × a replicate seed) is decided up front and enqueued; workers take them with Optuna's
  atomic WAITING→RUNNING transition, so no cell runs twice, on one machine or many. ``tpe``
  is adaptive and asks as it goes.
* **Liveness** (:mod:`.plan`). A running trial carries its worker's host, pid and a heartbeat;
  before planning, trials of dead workers are failed, their runs closed as KILLED and their
  cells re-queued.
* **Order of writes** (:mod:`.worker`). final metrics → Optuna ``tell`` → MLflow run
  FINISHED; a crash in between is repaired by the recovery above.

Modules: :mod:`.store` (storage, sampler, pruner), :mod:`.plan`, :mod:`.worker` (one
process's trials), :mod:`.run` (an invocation: plan, workers, summary), :mod:`.estimate`
(time before running), :mod:`.importance` (fANOVA for the report), :mod:`.optuna_compat`
(the only private Optuna API agelab uses).
"""

from agelab.study.estimate import estimate_trial_seconds, format_duration, size_warning
from agelab.study.identity import version_for_report, versions
from agelab.study.importance import param_importances
from agelab.study.plan import (
    A_BEAT,
    A_CELL,
    A_HOST,
    A_KEY,
    A_PARAMS,
    A_PID,
    A_REASON,
    A_RUN,
    SEED_PARAM,
    cell_id,
    distributions,
    plan,
    plan_key,
    planned_trials,
    recover,
)
from agelab.study.run import StudySummary, resolve_version, run_study, versioned
from agelab.study.store import counts, open_storage, open_study, plan_lock, storage_url
from agelab.study.worker import TrialOutcome, Worker

__all__ = [
    "A_BEAT",
    "A_CELL",
    "A_HOST",
    "A_KEY",
    "A_PARAMS",
    "A_PID",
    "A_REASON",
    "A_RUN",
    "SEED_PARAM",
    "StudySummary",
    "TrialOutcome",
    "Worker",
    "cell_id",
    "counts",
    "distributions",
    "estimate_trial_seconds",
    "format_duration",
    "open_storage",
    "open_study",
    "param_importances",
    "plan",
    "plan_key",
    "plan_lock",
    "planned_trials",
    "recover",
    "resolve_version",
    "run_study",
    "size_warning",
    "storage_url",
    "version_for_report",
    "versioned",
    "versions",
]

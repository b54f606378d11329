"""MLflow behind one seam: the only package that imports mlflow.

* :mod:`.store` — the :class:`Tracker` (runs by id, retries, masking), store checks, runs
  as DataFrames.
"""

from agelab.tracking.store import (
    DB_PORTS,
    FAILED,
    FINISHED,
    KILLED,
    RUNNING,
    TAG_KIND,
    TAG_REASON,
    TAG_STATE,
    TAG_STUDY,
    TAG_TRIAL,
    TAG_WORKER_HOST,
    TAG_WORKER_PID,
    Tracker,
    check_database,
    check_writable,
    default_artifact_location,
    default_uri,
    git_commit,
    global_tracking_uri,
    is_database_uri,
    probe_writable,
    runs_frame,
)

__all__ = [
    "DB_PORTS",
    "FAILED",
    "FINISHED",
    "KILLED",
    "RUNNING",
    "TAG_KIND",
    "TAG_REASON",
    "TAG_STATE",
    "TAG_STUDY",
    "TAG_TRIAL",
    "TAG_WORKER_HOST",
    "TAG_WORKER_PID",
    "Tracker",
    "check_database",
    "check_writable",
    "default_artifact_location",
    "default_uri",
    "git_commit",
    "global_tracking_uri",
    "is_database_uri",
    "probe_writable",
    "runs_frame",
]

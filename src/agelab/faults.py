"""Fault injection for the reliability tests: SIGKILL this process at a named point.

Production code calls :func:`kill_point` at the places where a crash is most dangerous
(half-written cache, mid-epoch, inside an MLflow write, either side of Optuna's ``tell``).
Nothing happens unless ``$AGELAB_KILL_AT`` is set, e.g.::

    AGELAB_KILL_AT="train.step:5"                # SIGKILL at the 5th training step
    AGELAB_KILL_AT="cache.write:2,study.tell.after:1"

The count is per process (a fork starts again at zero). With ``$AGELAB_KILL_LOG`` set to a
file, the point and the pid are appended to it just before the kill, so a test can check
where the process died. Unset, a call costs two environment lookups.

``$AGELAB_PAUSE_AT`` makes a process slow instead of dead: it sleeps at the n-th hit of a
point (a worker that is alive but takes longer than ``AGELAB_STALE_AFTER`` for an epoch)::

    AGELAB_PAUSE_AT="train.step:1=15"            # sleep 15 s at the 1st training step

With ``$AGELAB_KILL_LOG`` set, ``pause <point>:<hit> pid <pid> <seconds>s`` is appended to
it when the pause begins.
"""

from __future__ import annotations

import os
import signal
import time

ENV_KILL_AT = "AGELAB_KILL_AT"
ENV_KILL_LOG = "AGELAB_KILL_LOG"
ENV_PAUSE_AT = "AGELAB_PAUSE_AT"

#: Every named point, and where it is.
POINTS = {
    "cache.write": "data cache: a file written to its temp name, before it is moved into place",
    "train.step": "training: before each optimiser step",
    "mlflow.log_metrics": "tracking: before each metrics batch is written",
    "mlflow.log_artifacts": "tracking: before a trial's artifacts are copied",
    "study.tell.before": "study: final metrics logged, Optuna not yet told",
    "study.tell.after": "study: Optuna told, the MLflow run not yet closed",
}

_hits: dict[str, int] = {}
_hits_pid = 0


def parse_spec(spec: str) -> dict[str, int]:
    """``"a:2,b:1"`` → ``{"a": 2, "b": 1}`` (a bare name means its first hit)."""
    targets: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, count = part.partition(":")
        if name not in POINTS:
            raise ValueError(f"{ENV_KILL_AT}: unknown point {name!r}; valid: {', '.join(POINTS)}")
        targets[name] = int(count) if count else 1
    return targets


def parse_pauses(spec: str) -> dict[str, tuple[int, float]]:
    """``"a:2=15,b=3"`` → ``{"a": (2, 15.0), "b": (1, 3.0)}`` (point: hit, seconds)."""
    pauses: dict[str, tuple[int, float]] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        where, sep, seconds = part.partition("=")
        if not sep:
            raise ValueError(f"{ENV_PAUSE_AT}: {part!r} needs '=<seconds>' (e.g. train.step:1=15)")
        ((name, hit),) = parse_spec(where).items()
        pauses[name] = (hit, float(seconds))
    return pauses


def kill_point(name: str) -> None:
    """SIGKILL this process if ``$AGELAB_KILL_AT`` names this point and this hit; sleep if
    ``$AGELAB_PAUSE_AT`` does."""
    spec, pause = os.environ.get(ENV_KILL_AT), os.environ.get(ENV_PAUSE_AT)
    if not spec and not pause:
        return
    global _hits_pid
    if _hits_pid != os.getpid():  # counts are per process
        _hits.clear()
        _hits_pid = os.getpid()
    _hits[name] = _hits.get(name, 0) + 1
    log = os.environ.get(ENV_KILL_LOG)
    hit, seconds = parse_pauses(pause).get(name, (0, 0.0)) if pause else (0, 0.0)
    if hit == _hits[name]:
        if log:
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(f"pause {name}:{hit} pid {os.getpid()} {seconds:g}s\n")
        time.sleep(seconds)
    if not spec or parse_spec(spec).get(name) != _hits[name]:
        return
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{name}:{_hits[name]} pid {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)

"""One invocation of a study: plan (or join), run trials in N workers, summarise.

The study's parent MLflow run records the config, its hash, the dataset fingerprint, the
device and the library versions; each trial is a nested run (see :mod:`.worker`). Writing
the ablation report afterwards is the caller's job (``agelab run`` does it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from agelab.config import Range, StudyConfig, flatten
from agelab.secrets import mask_uri
from agelab.study.estimate import estimate_trial_seconds, size_warning
from agelab.study.plan import plan, recover
from agelab.study.store import counts, open_storage, open_study, plan_lock, storage_url
from agelab.study.worker import Worker
from agelab.tracking import (
    FINISHED,
    KILLED,
    TAG_KIND,
    TAG_STUDY,
    Tracker,
    git_commit,
)


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


def run_study(
    cfg: StudyConfig,
    *,
    workers: int = 1,
    n_trials: int | None = None,
    join: bool = False,
    quiet: bool = False,
) -> StudySummary:
    """Plan (or join) a study, run its trials in ``workers`` processes, summarise."""
    t0 = time.time()
    tracker = Tracker(cfg.tracking, cfg.tracking.experiment or cfg.name)
    url = storage_url(cfg)
    study = open_study(cfg, open_storage(url))
    total = cfg.search.n_total()
    if total > cfg.search.warn_cells:
        print(size_warning(cfg, *seconds_per_trial(cfg, study)))
    if not join:
        _plan(cfg, study, tracker, url, total)
    parent = _start_parent_run(cfg, tracker, url, workers, quiet)
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
    summary.best = _best(study)
    _print_summary(cfg, summary, tracker, time.time() - t0)
    return summary


def _plan(cfg: StudyConfig, study: optuna.Study, tracker: Tracker, url: str, total: int) -> None:
    """Recover trials of dead workers and enqueue what is missing (one process at a time)."""
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


def _start_parent_run(
    cfg: StudyConfig, tracker: Tracker, url: str, workers: int, quiet: bool
) -> str:
    """The study's parent run. The data is built (or loaded) here, once, before any worker
    starts, so workers hit the cache; its fingerprint is tagged."""
    from agelab.data.load import load_dataset

    fingerprint = load_dataset(cfg.data, progress=not quiet).fingerprint
    parent = tracker.start_run(
        f"{cfg.name} · {time.strftime('%Y-%m-%d %H:%M')}",
        tags={
            TAG_KIND: "study",
            TAG_STUDY: cfg.name,
            "agelab.sampler": cfg.search.sampler,
            "agelab.config_hash": config_hash(cfg),
            "agelab.git_commit": git_commit(),
            "agelab.dataset_fingerprint": fingerprint,
            "agelab.device": _device_name(cfg),
            "agelab.workers": workers,
            "optuna.study_name": cfg.name,
            "optuna.storage": mask_uri(url),
            "mlflow.note.content": cfg.description,
        }
        | _versions(),
    )
    space = {
        k: (v.model_dump() if isinstance(v, Range) else v) for k, v in cfg.search.space.items()
    }
    tracker.log_params(parent, flatten(cfg) | {"search.space": json.dumps(space)})
    return parent


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


def _best(study: optuna.Study) -> dict[str, Any] | None:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    best = min(done, key=lambda t: t.value)
    return {"number": best.number, "calib_mae": best.value, "params": best.params}


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

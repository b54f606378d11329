"""One invocation of a study: plan (or join), run trials in N workers, summarise.

The study's parent MLflow run records the config, its hash, the dataset fingerprint, the
device and the library versions; each trial is a nested run (see :mod:`.worker`). Writing
the ablation report afterwards is the caller's job (``agelab run`` does it).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from agelab.errors import StoreError, transient_cause
from agelab.secrets import mask_uri
from agelab.study.check import check
from agelab.study.check import summary as check_summary
from agelab.study.estimate import estimate_trial_seconds, size_warning
from agelab.study.identity import (
    Binding,
    bind,
    check_experiment,
    choose_version,
    config_changed,
    identity,
    identity_hash,
    legacy_changes,
    stored_identity,
    version_name,
    versions,
)
from agelab.study.placement import describe, placement_for
from agelab.study.plan import A_PARAMS, completed, is_stale, plan, recover, valid_complete
from agelab.study.store import counts, open_storage, open_study, plan_lock, storage_url
from agelab.study.worker import Worker
from agelab.tracking import (
    FAILED,
    FINISHED,
    KILLED,
    TAG_KIND,
    TAG_STUDY,
    Tracker,
    check_writable,
    git_commit,
)
from agelab.tracking.datasets import DatasetRecord, data_source, whole_dataset
from agelab.tracking.store import TAG_DESCRIPTION, TAG_NOTE


@dataclass
class StudySummary:
    study_name: str
    parent_run_id: str
    counts: dict[str, int]
    planned: int
    ok: bool
    best: dict[str, Any] | None = None
    config: StudyConfig | None = None  # as run: under the version's name
    complete: int = 0  # valid COMPLETE trials of the current plan


def run_study(
    cfg: StudyConfig,
    *,
    workers: int | None = 1,
    n_trials: int | None = None,
    join: bool = False,
    quiet: bool = False,
    new_version: bool = False,
    gpus: list[int] | None = None,
    workers_per_gpu: int | None = None,
) -> StudySummary:
    """Plan (or join) a study, run its trials in ``workers`` processes, summarise.

    The config is first bound to a version of the study (:mod:`.identity`): the one whose
    results it would reproduce, a new one with ``new_version``, or a refusal listing what
    changed. Everything after that runs under the version's name.

    ``workers`` (None: from the GPU flags, else 1), ``gpus`` and ``workers_per_gpu`` decide
    the worker processes and the GPU each one sees (:mod:`.placement`); one worker without
    GPU flags runs in this process."""
    t0 = time.time()
    placement = placement_for(cfg.train.device, workers, gpus, workers_per_gpu)
    placed = gpus is not None or workers_per_gpu is not None
    workers = len(placement)
    check_writable(cfg.tracking)  # a full or read-only store stops us before any work
    from agelab.device import resolve_device

    resolve_device(cfg.train.device)  # cuda without a usable GPU stops here; auto warns
    fingerprint, whole = _dataset_fingerprint(cfg, quiet)
    url = storage_url(cfg)
    storage = open_storage(url)
    binding = resolve_version(cfg, storage, fingerprint, new_version=new_version, join=join)
    cfg = versioned(cfg, binding.version)
    tracker = Tracker(cfg.tracking, cfg.tracking.experiment or cfg.name)
    tracker.describe_experiment(cfg.description)
    study = open_study(cfg, storage)
    total = cfg.search.n_total()
    if total > cfg.search.warn_cells:
        print(size_warning(cfg, *seconds_per_trial(cfg, study)))
    if not join:
        _plan(cfg, study, tracker, url, total)
    parent = _start_parent_run(cfg, tracker, url, workers, binding, fingerprint)
    tracker.log_datasets(parent, [dataclasses.replace(whole, name=cfg.name)])
    status = FINISHED
    try:
        if workers <= 1 and not placed:
            _run_inline(cfg, parent, n_trials, quiet, total)
        else:
            _run_processes(cfg, parent, workers, n_trials, placement)
    except KeyboardInterrupt:
        status = KILLED
        raise KeyboardInterrupt(
            "the study is resumable — run the same command again to continue"
        ) from None
    except BaseException:
        status = FAILED
        raise
    finally:
        final = _close_parent(study, tracker, parent, status, time.time() - t0)
    # Trials still RUNNING under a live worker belong to another invocation: not a failure.
    lost = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if is_stale(t)
    ]
    summary = StudySummary(cfg.name, parent, final, total, ok=not lost, config=cfg)
    summary.best = _best(study)
    summary.complete = completed(study, cfg)[0]
    _print_summary(cfg, summary, tracker, time.time() - t0)
    return summary


def _plan(cfg: StudyConfig, study: optuna.Study, tracker: Tracker, url: str, total: int) -> None:
    """Recover trials of dead workers and enqueue what is missing (one process at a time)."""
    with plan_lock(cfg):
        recovered = recover(study, tracker)
        findings = check(study, tracker)
        added = plan(study, cfg)
    if recovered:
        print(f"recovered {recovered} trial(s) left running by a dead worker; re-queued")
    if findings:
        print("\n".join(check_summary(findings, repaired=True)))
    done, outside = completed(study, cfg)
    print(
        f"study {cfg.name!r}: {total} planned trial(s), {done} complete, "
        f"{added} newly queued, {counts(study)['WAITING']} waiting"
        + (f"; {outside} complete trial(s) outside this plan kept" if outside else "")
        + f" (optuna {mask_uri(url)}, mlflow {mask_uri(tracker.uri)})"
    )


def _close_parent(
    study: optuna.Study, tracker: Tracker, parent: str, status: str, seconds: float
) -> dict[str, int]:
    """Trial counts on the parent run, and the run closed. When the study is already
    stopping on an error (a full disk, say), a second failure here is said in one line
    instead of burying the first under another traceback; the next run repairs the run."""
    final = counts(study)
    try:
        tracker.log_metrics(
            parent,
            {f"trials_{k.lower()}": v for k, v in final.items()} | {"study_seconds": seconds},
        )
        tracker.end_run(parent, status)
    except Exception as exc:
        if status == FINISHED:
            raise
        cause = transient_cause(exc) or exc
        print(f"warning: could not close the study's parent run ({mask_uri(cause)})")
    return final


def _dataset_fingerprint(cfg: StudyConfig, quiet: bool) -> tuple[str, DatasetRecord]:
    """Build (or load) the data once, before any worker starts, so workers hit the cache;
    its fingerprint is part of the study's identity. With it: the whole dataset's manifest
    rows for the parent run's dataset input (the images are let go)."""
    from agelab.data.load import load_dataset

    data = load_dataset(cfg.data, progress=not quiet)
    return data.fingerprint, whole_dataset(cfg.name, data_source(cfg.data), data)


def resolve_version(
    cfg: StudyConfig,
    storage: optuna.storages.BaseStorage,
    fingerprint: str,
    *,
    new_version: bool = False,
    join: bool = False,
) -> Binding:
    """The version of study ``cfg.name`` this config runs in (created and bound if new)."""
    ident = identity(cfg, fingerprint)
    with plan_lock(cfg):  # two invocations must not both create version k + 1
        names = versions(storage, cfg.name)
        found = {k: stored_identity(optuna.load_study(study_name=n, storage=storage))
                 for k, n in names.items()}  # fmt: skip
        k, create = choose_version(found, cfg.name, ident, new_version=new_version, join=join)
        binding = Binding(version_name(cfg.name, k), k, ident, identity_hash(ident), create)
        run_cfg = versioned(cfg, k)
        study = open_study(run_cfg, storage)
        experiment = run_cfg.tracking.experiment or run_cfg.name
        if create or found.get(k) is None:
            binding.adopted = not create and bool(study.get_trials(deepcopy=False))
            if binding.adopted:
                _refuse_legacy_changes(run_cfg, ident)
            bind(study, cfg.name, k, ident, experiment)
        else:
            check_experiment(study, experiment)
    if binding.created and k > 1:
        print(f"study {cfg.name!r}: version {k} ({binding.name!r}) starts with this config; "
              f"version {k - 1} stays as it was")  # fmt: skip
    elif binding.adopted:
        print(f"study {binding.name!r} was made before agelab recorded configs: its trials "
              "are taken to be of this config from now on")  # fmt: skip
    return binding


def _refuse_legacy_changes(cfg: StudyConfig, ident: dict[str, Any]) -> None:
    """A study made before agelab recorded identities is adopted only by the config it was
    first run with, read back from its first parent run's params in MLflow."""
    try:
        tracker = Tracker(cfg.tracking, cfg.tracking.experiment or cfg.name, create=False)
    except StoreError:
        return  # no store to compare with: nothing of the old results can be mixed in either
    parents = [
        r
        for r in tracker.search(f"tags.`{TAG_STUDY}` = '{cfg.name}'")
        if r.data.tags.get(TAG_KIND) == "study"
    ]
    if not parents:
        return
    first = min(parents, key=lambda r: r.info.start_time or 0)
    changes = legacy_changes(ident, first.data.params, first.data.tags)
    if changes:
        raise config_changed(cfg.name, 1, {}, {}, changes=changes)


def versioned(cfg: StudyConfig, version: int) -> StudyConfig:
    """The config under version ``version``'s study name (and experiment: ``<experiment>.vK``)."""
    tracking = cfg.tracking
    if tracking.experiment:
        tracking = tracking.model_copy(
            update={"experiment": version_name(tracking.experiment, version)}
        )
    return cfg.model_copy(update={"name": version_name(cfg.name, version), "tracking": tracking})


def _start_parent_run(
    cfg: StudyConfig,
    tracker: Tracker,
    url: str,
    workers: int,
    binding: Binding,
    fingerprint: str,
) -> str:
    """The study's parent run: what ran, where, from which code and data."""
    parent = tracker.start_run(
        f"{cfg.name} · {time.strftime('%Y-%m-%d %H:%M')}",
        tags={
            TAG_KIND: "study",
            TAG_STUDY: cfg.name,
            "agelab.sampler": cfg.search.sampler,
            "agelab.config_hash": binding.hash,
            "agelab.study_version": binding.version,
            "agelab.git_commit": git_commit(),
            "agelab.dataset_fingerprint": fingerprint,
            "agelab.device": _device_name(cfg),
            "agelab.workers": workers,
            "optuna.study_name": cfg.name,
            "optuna.storage": mask_uri(url),
            TAG_DESCRIPTION: cfg.description,
            TAG_NOTE: cfg.description,  # the report adds its verdict (agelab.reporting)
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
    done = valid_complete(study)
    if not done:
        return None
    best = min(done, key=lambda t: t.value)
    params = best.user_attrs.get(A_PARAMS, best.params)
    return {"number": best.number, "calib_mae": best.value, "params": params}


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


def _run_processes(
    cfg: StudyConfig,
    parent: str,
    workers: int,
    n_trials: int | None,
    placement: list[dict[str, str]] | None = None,
) -> None:
    """N worker processes on this machine; Ctrl-C reaches them all (same process group).
    Worker i's environment gets ``placement[i]`` (its ``CUDA_VISIBLE_DEVICES``)."""
    if placement and describe(placement):
        print(describe(placement), flush=True)
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
            procs.append(subprocess.Popen(cmd, env=env | (placement[i] if placement else {})))
        rcs = [p.wait() for p in procs]
        stopped = [rc for rc in rcs if rc not in (0, 130)]
        if stopped:  # each worker said why above; the study must not look finished
            raise StoreError(
                f"{len(stopped)} of {workers} worker(s) stopped (exit codes {rcs}): see their "
                "messages above; run the same command again once that is fixed"
            )
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
        f"\nstudy {cfg.name!r} done in {seconds / 60:.1f} min: {s.complete} of {s.planned} "
        f"planned trial(s) complete; {c['PRUNED']} pruned, {c['FAIL']} failed, "
        f"{c['WAITING']} waiting, {c['RUNNING']} running"
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

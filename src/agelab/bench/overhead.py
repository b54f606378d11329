"""Tracking overhead: the share of a real trial's wall time spent in MLflow calls, and the same
trial logged by optuna-integration's ``MLflowCallback`` instead.

agelab side: one trial of a (shrunk) demo study run by a :class:`agelab.study.Worker` in a
throw-away store; the :class:`agelab.tracking.Tracker` counts every MLflow call it makes and
their wall time (``Tracker.calls`` / ``Tracker.call_seconds``). The trial wall time is the
worker's: take the trial from the queue → fit → evaluate → record → tell.

Baseline: the same cell, data and training config run by a plain ``optuna.Study.optimize``
whose objective builds the model, fits it and returns the calib MAE, with
``MLflowCallback(metric_name="calib_mae")`` logging each trial; the callback's own time is
its MLflow cost. Both stores (tables and experiment) exist before either timing starts.

This module imports optuna and mlflow directly for the baseline — an exception to agelab's
rule that only :mod:`agelab.study` / :mod:`agelab.tracking` touch them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agelab.bench.common import describe_config, empty_store, mlflow_global_uri, say

__all__ = ["agelab_trial_overhead", "bench_tracking", "mlflow_callback_overhead", "run_records"]


def run_records(client: Any, run_id: str) -> dict[str, int]:
    """What a run holds: params, metric keys, metric values (whole histories), tags
    (MLflow's own ``mlflow.*`` excluded), artifact files and their bytes."""
    run = client.get_run(run_id)
    values = sum(len(client.get_metric_history(run_id, key)) for key in run.data.metrics)
    files, size = 0, 0
    folders = [None]
    while folders:
        for item in client.list_artifacts(run_id, folders.pop()):
            if item.is_dir:
                folders.append(item.path)
            else:
                files += 1
                size += int(item.file_size or 0)
    return {
        "params": len(run.data.params),
        "metric_keys": len(run.data.metrics),
        "metric_values": values,
        "tags": sum(1 for k in run.data.tags if not k.startswith("mlflow.")),
        "artifacts": files,
        "artifact_kb": round(size / 1024, 1),
    }


def agelab_trial_overhead(cfg) -> dict[str, Any]:
    """One trial of ``cfg`` through a Worker; MLflow seconds / trial wall time."""
    from agelab.study import A_PARAMS, A_RUN, Worker, open_storage, open_study, plan, storage_url
    from agelab.tracking import TAG_KIND, Tracker

    tracker = Tracker(cfg.tracking, cfg.name)
    study = open_study(cfg, open_storage(storage_url(cfg)))
    plan(study, cfg)
    parent = tracker.start_run(f"{cfg.name} (bench)", tags={TAG_KIND: "study"})
    worker = Worker(cfg, parent, quiet=True)
    worker.dataset(cfg)  # a worker loads its data once, before its first trial
    calls0, seconds0 = worker.tracker.calls, worker.tracker.call_seconds
    t0 = time.perf_counter()
    outcomes = worker.loop(1)
    wall = time.perf_counter() - t0
    calls = worker.tracker.calls - calls0
    seconds = worker.tracker.call_seconds - seconds0
    tracker.end_run(parent)
    if not outcomes or outcomes[0].state != "COMPLETE":
        reason = outcomes[0].reason if outcomes else "no trial ran"
        raise RuntimeError(f"the tracking-overhead trial did not complete: {reason}")
    trial = worker.study.get_trials(deepcopy=False)[outcomes[0].number]
    return {
        "trial_seconds": wall,
        "mlflow_seconds": seconds,
        "mlflow_calls": calls,
        "share": seconds / wall,
        "records": run_records(tracker.client, trial.user_attrs[A_RUN]),
        "params": dict(trial.user_attrs.get(A_PARAMS, trial.params)),  # a planned trial's cell
    }


def mlflow_callback_overhead(cfg, params: dict[str, Any], root: Path) -> dict[str, Any]:
    """The same trial (``params``: the cell and seed) through ``study.optimize`` with
    optuna-integration's ``MLflowCallback`` in a SQLite store under ``root``."""
    import optuna
    from mlflow.tracking import MlflowClient

    from agelab.data.load import load_dataset

    uri = empty_store(root / "mlflow.db")
    name = f"{cfg.name}-callback"
    client = MlflowClient(uri)
    client.create_experiment(name, artifact_location=(root / "artifacts").resolve().as_uri())
    objective = _plain_objective(cfg, load_dataset(cfg.data, progress=False))
    callback, spent = _timed_mlflow_callback(uri)
    with mlflow_global_uri(uri):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=name, direction="minimize")
        study.enqueue_trial(params)
        t0 = time.perf_counter()
        study.optimize(objective, n_trials=1, callbacks=[callback])
        wall = time.perf_counter() - t0
    if study.trials[0].state.name != "COMPLETE":
        raise RuntimeError("the MLflowCallback trial did not complete")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    return {
        "trial_seconds": wall,
        "mlflow_seconds": sum(spent),
        "share": sum(spent) / wall,
        "records": run_records(client, runs[0].info.run_id),
    }


def _plain_objective(cfg, data) -> Callable[[Any], float]:
    """The objective of optuna-examples: suggest the cell and seed, build, fit, return the
    calib MAE."""
    from agelab.objective import build_trial_model
    from agelab.study import SEED_PARAM
    from agelab.train import fit, predict

    calib = data.indices("calib")

    def objective(trial) -> float:
        chosen = {k: trial.suggest_categorical(k, list(v)) for k, v in cfg.search.space.items()}
        seed = trial.suggest_categorical(SEED_PARAM, list(cfg.search.seeds))
        cfg_t = cfg.with_params(chosen | {"train.seed": seed})
        model, _ = build_trial_model(cfg_t, data.image_size)
        fit(model, data, cfg_t.train)
        pred = predict(model, data.images[calib], batch_size=cfg_t.train.eval_batch_size)
        return float(np.mean(np.abs(pred.astype(np.float64) - data.ages[calib])))

    return objective


def _timed_mlflow_callback(uri: str) -> tuple[Callable[[Any, Any], None], list[float]]:
    """optuna-integration's ``MLflowCallback`` logging to ``uri``, wrapped to add its wall
    time per call to the returned list."""
    from optuna_integration import MLflowCallback

    with warnings.catch_warnings():  # deprecated since optuna-integration 4.9: said in the table
        warnings.simplefilter("ignore", FutureWarning)
        callback = MLflowCallback(tracking_uri=uri, metric_name="calib_mae")
    spent: list[float] = []

    def timed(study, trial) -> None:
        t = time.perf_counter()
        callback(study, trial)
        spent.append(time.perf_counter() - t)

    return timed, spent


def bench_tracking(cfg, root: Path, *, verbose: bool = True) -> dict[str, Any]:
    """agelab's trial tracking cost and the MLflowCallback baseline on the same trial."""
    ours = agelab_trial_overhead(cfg)
    theirs = mlflow_callback_overhead(cfg, ours["params"], root / "callback")
    result = {
        "config": describe_config(cfg, trials=False),
        "agelab": ours,
        "mlflow_callback": theirs,
    }
    if verbose:
        say(
            f"tracking: agelab {ours['mlflow_seconds']:.2f} s in {ours['mlflow_calls']} MLflow "
            f"calls of a {ours['trial_seconds']:.1f} s trial ({ours['share']:.1%}); "
            f"MLflowCallback {theirs['mlflow_seconds']:.2f} s of {theirs['trial_seconds']:.1f} s "
            f"({theirs['share']:.1%})"
        )
    return result

"""Study files for process-level tests, and what must hold after any crash and recovery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from agelab.config import StudyConfig, load_config
from agelab.study import (
    A_KEY,
    A_REASON,
    A_RUN,
    open_storage,
    open_study,
    plan_key,
    planned_trials,
    storage_url,
    version_for_report,
    versioned,
)
from agelab.study.identity import S_HASH
from agelab.study.plan import valid_complete
from agelab.tracking import TAG_KIND, TAG_STATE, TAG_STUDY, TAG_TRIAL, default_uri
from helpers import REPO
from helpers.studies import tiny_study


def write_study(root: Path, name: str, **sections) -> Path:
    """A tiny study file on the store and data cache under ``root``."""
    raw = tiny_study(root, name, **sections)
    raw["data"].setdefault("cache_dir", str(root / "cache"))
    raw["train"]["device"] = "cpu"  # the memory cap and the hit counts assume the CPU path
    if "report" in StudyConfig.model_fields:  # the ablation report is not under test here
        raw["report"] = {"auto": False}
    path = root / f"{name}.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def tail(log: Path, n: int = 40) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else ["(no log)"]
    return "\n".join(lines[-n:])


def consistent_in_a_new_process(path: Path, overrides: tuple[str, ...] = ()) -> dict[str, int]:
    """:func:`assert_study_consistent` in a new process. MLflow keeps one store and SQL engine
    per URI for the life of a process, so after a test deleted or replaced a store file, only
    a new process (as a user's next command) sees the new one."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from helpers.invariants import assert_study_consistent as check;"
        "print(json.dumps(check(Path(sys.argv[2]), tuple(sys.argv[3:]))))"
    )
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    tests = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-c", code, tests, str(path), *overrides],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


FINAL_METRICS = ("mae", "calib_mae", "coverage_at_mae", "conformal_90_coverage", "train_loss")
#: Why a trial may have failed and been planned again (never the trial's own error).
REQUEUED = ("worker died", "stopped:", "interrupted")
#: States of trial runs that do not hold a result: closed attempts, or set aside by a check.
NOT_A_RESULT = {"FAIL", "PRUNED", "KILLED", "INVALID", "ORPHAN", "DUPLICATE"}


def assert_study_consistent(
    path: Path, overrides: tuple[str, ...] = (), secrets: tuple[str, ...] = ()
) -> dict[str, int]:
    """The invariant after any crash and the prescribed recovery, for the study version the
    config (``path`` + ``overrides``) runs in: every planned cell COMPLETE exactly once (valid)
    in Optuna, with exactly one FINISHED MLflow run that carries the config's identity hash
    and its metrics; nothing RUNNING or WAITING; every other trial run closed or set aside;
    every run of this study; no secret in any param or tag."""
    cfg = load_config(path, list(overrides))
    storage = open_storage(storage_url(cfg))
    cfg = versioned(cfg, version_for_report(storage, cfg)[0])
    study = open_study(cfg, storage)
    config_hash = study.user_attrs[S_HASH]
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    complete = valid_complete(study)
    keys = [t.user_attrs[A_KEY] for t in complete]
    planned = sorted(plan_key(p) for p in planned_trials(cfg))
    assert sorted(k for k in keys if k in planned) == planned, "a cell missing or repeated"
    assert len(keys) == len(set(keys)), "a cell has two valid results"
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0, states
    for t in trials:
        if t.state == TrialState.FAIL:  # only trials stopped from outside, all re-queued
            assert t.user_attrs[A_REASON].startswith(REQUEUED), t.user_attrs

    client = MlflowClient(default_uri(cfg.tracking))
    exp = client.get_experiment_by_name(cfg.tracking.experiment or cfg.name)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    statuses = Counter(r.info.status for r in runs)
    assert statuses["RUNNING"] == 0, statuses
    assert all(r.data.tags[TAG_STUDY] == cfg.name for r in runs)  # no run of another study
    parents = {r.info.run_id: r for r in runs if r.data.tags[TAG_KIND] == "study"}
    nested = {r.info.run_id: r for r in runs if r.data.tags[TAG_KIND] == "trial"}
    assert all(r.data.tags["mlflow.parentRunId"] in parents for r in nested.values())
    assert {r.info.status for r in parents.values()} <= {"FINISHED", "KILLED", "FAILED"}
    for t in complete:
        run = nested.pop(t.user_attrs[A_RUN])
        assert run.info.status == "FINISHED" and int(run.data.tags[TAG_TRIAL]) == t.number
        assert run.data.tags.get("agelab.config_hash") == config_hash
        assert set(FINAL_METRICS) <= set(run.data.metrics), sorted(run.data.metrics)
        objective = run.data.metrics.get("best_calib_mae", run.data.metrics["calib_mae"])
        assert objective == pytest.approx(t.value)
    leftovers = list(nested.values())  # attempts that hold no result
    for r in leftovers:
        state = r.data.tags.get(TAG_STATE, "")
        assert r.info.status in ("KILLED", "FAILED") or state in NOT_A_RESULT, (r.info, state)
    for r in runs:
        text = " ".join(map(str, [*r.data.params.values(), *r.data.tags.values()]))
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"secret in run {r.info.run_id}: {leaked}"
    return {"complete": len(complete), "killed_runs": len(leftovers), "runs": len(runs)}

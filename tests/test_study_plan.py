"""Planning a study without training: Optuna's queue, the private API pinned, and the
smoke study's numbers against recorded ones (tests/data/smoke_baseline.json)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from agelab.cli import main
from agelab.config import validate
from agelab.study import (
    A_KEY,
    A_REASON,
    SEED_PARAM,
    open_storage,
    open_study,
    optuna_compat,
    plan,
    planned_trials,
    storage_url,
)
from agelab.study.plan import trial_config, trial_params
from agelab.tracking import default_uri
from helpers import REPO
from helpers.studies import tiny_study

BASELINE = Path(__file__).parent / "data" / "smoke_baseline.json"


def test_optuna_private_api_agelab_relies_on(tmp_path: Path) -> None:
    """What :mod:`agelab.study.optuna_compat` needs from Optuna's internals, on a real
    journal storage: an enqueued trial is popped once (WAITING→RUNNING) with its planned params,
    an empty queue gives None (never a new trial), and another process's trial can be
    annotated until it finishes."""
    cfg = validate(tiny_study(tmp_path))
    study = open_study(cfg, open_storage(storage_url(cfg)))
    assert hasattr(study, "_pop_waiting_trial_id") and hasattr(study, "_storage")
    assert plan(study, cfg) == 4
    taken = []
    while (trial := optuna_compat.pop_waiting_trial(study)) is not None:
        assert isinstance(trial, optuna.Trial)
        taken.append(trial_params(trial, cfg))
    assert len(taken) == 4 and len({json.dumps(p, sort_keys=True) for p in taken}) == 4
    assert taken == planned_trials(cfg)  # the queue keeps the planned order
    assert len(study.get_trials()) == 4, "popping an empty queue must not create a trial"

    frozen = study.get_trials(states=(TrialState.RUNNING,))[0]
    assert isinstance(frozen._trial_id, int)
    optuna_compat.set_user_attr(study, frozen, A_REASON, "worker died (test)")
    assert study.trials[frozen.number].user_attrs[A_REASON] == "worker died (test)"
    study.tell(frozen.number, state=TrialState.FAIL)  # public: fail a trial by number
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        optuna_compat.set_user_attr(study, frozen, A_REASON, "too late")


def test_optuna_journal_internals_the_repairing_backend_relies_on(tmp_path: Path) -> None:
    """``RepairingJournalBackend`` re-implements Optuna's ``append_logs`` around a hook: it
    needs ``_file_path``, ``_lock`` and ``get_lock_file`` as Optuna 5 has them."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
    from optuna.storages.journal._file import get_lock_file

    path = tmp_path / "j.log"
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    assert backend._file_path == str(path) and backend._lock is not None
    with get_lock_file(backend._lock):
        pass
    seen = []
    ours = optuna_compat.RepairingJournalBackend(
        str(path), JournalFileOpenLock(str(path)), before_append=seen.append
    )
    ours.append_logs([{"op_code": 0, "x": 1}])
    assert seen == [path] and list(ours.read_logs(0)) == [{"op_code": 0, "x": 1}]


def test_plan_is_idempotent_and_requeues_only_what_is_missing(tmp_path: Path) -> None:
    cfg = validate(tiny_study(tmp_path, search={"seeds": [0, 1]}))
    study = open_study(cfg, open_storage(storage_url(cfg)))
    assert plan(study, cfg) == 8
    assert plan(study, cfg) == 0  # already queued
    keys = [t.user_attrs[A_KEY] for t in study.get_trials()]
    assert len(set(keys)) == 8 and all(k.endswith(("seed=0", "seed=1")) for k in keys)
    assert {p[SEED_PARAM] for p in planned_trials(cfg)} == {0, 1}


@pytest.mark.slow
def test_smoke_study_numbers_unchanged_since_recorded(tmp_path: Path) -> None:
    """``agelab run experiments/smoke.yaml`` gives the test metrics recorded in
    tests/data/smoke_baseline.json, cell by cell: first before the #13 restructuring (which
    kept every number), re-recorded when #15 changed splits and replicates on purpose. A
    change of these numbers must be as deliberate. On this project's machines they are equal
    to the last digit; the tolerance only absorbs another CPU's float rounding (one
    prediction crossing a coverage threshold moves a share by 1/n)."""
    baseline = json.loads(BASELINE.read_text())
    root = tmp_path / "mlruns"
    assert main(["run", str(REPO / "experiments/smoke.yaml"), f"tracking.root={root}",
                 "report.auto=false", "--quiet"]) == 0  # fmt: skip
    client = MlflowClient(
        default_uri(validate({"name": "x", "tracking": {"root": str(root)}}).tracking)
    )
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], "tags.`agelab.run_kind` = 'trial'")
    got = {r.data.tags["agelab.cell"]: r.data.metrics for r in runs}
    assert set(got) == set(baseline["cells"])
    for cell, expected in baseline["cells"].items():
        n = expected["n"]
        for name, value in expected.items():
            tol = 1.0 / n + 1e-9 if name.startswith("coverage") or "coverage" in name else 0.0
            assert got[cell][name] == pytest.approx(value, rel=1e-4, abs=tol), (cell, name)


@pytest.mark.parametrize(
    ("varies", "split_seeds"), [(["init", "split"], {7, 8}), (["init"], {7}), (["split"], {7, 8})]
)
def test_a_replicate_varies_what_the_study_says_and_pairs_stay_paired(
    tmp_path: Path, varies: list[str], split_seeds: set[int]
) -> None:
    cfg = validate(tiny_study(tmp_path, search={"seeds": [0, 1], "replicate_varies": varies}))
    cfg = cfg.with_params({"data.split.seed": 7, "train.seed": 3})
    configs = [trial_config(cfg, p) for p in planned_trials(cfg)]
    assert {c.data.split.seed for c in configs} == split_seeds
    init = {c.train.seed for c in configs}
    assert init == ({0, 1} if "init" in varies else {3})
    by_seed: dict[int, set] = {}
    for params, c in zip(planned_trials(cfg), configs, strict=True):
        by_seed.setdefault(params[SEED_PARAM], set()).add((c.train.seed, c.data.split.seed))
    assert all(len(pairs) == 1 for pairs in by_seed.values())  # every cell of a replicate alike

"""Faults: SIGKILL at seeded points then resume, a full or read-only store, two studies at
once in one store, a trial that runs out of memory.

Every process under test is a real ``agelab run`` (``agelab.cli.main``) in its own process.
They are forked from a *zygote*: a Python process that imported torch, timm, mlflow and
optuna once (~10 s on 2 cores) and forks one child per invocation, so each of the ~30 runs
here starts in milliseconds. The zygote opens no store and runs no torch op, so a child is
what a fresh ``agelab run`` is, minus the import time. Kills come from
:mod:`agelab.faults`: the child SIGKILLs itself at the n-th hit of a named point, so every
kill lands at an exact, reproducible place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from agelab import faults
from agelab.config import load_config
from agelab.data.cache import CacheWarning
from agelab.data.load import load_dataset
from agelab.study import (
    A_REASON,
    A_RUN,
    open_storage,
    open_study,
    storage_url,
)
from agelab.tracking import TAG_KIND, TAG_REASON, TAG_STUDY, default_uri
from helpers import REPO
from helpers.invariants import assert_study_consistent, tail, write_study
from helpers.namespaces import why_no_mount_namespace
from helpers.zygote import Zygote

# ------------------------------------------------------------------------------ zygote


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def check_cache(path: Path) -> None:
    """The study's data cache entry loads and verifies (no warning); no temp file is left."""
    cfg = load_config(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        data = load_dataset(cfg.data, progress=False)
    assert data.info["cache_hit"], "the cache entry was not rebuilt"
    assert not list(Path(cfg.data.cache_dir).glob(".*.tmp")), "temp files of a dead writer"


# ----------------------------------------------------------------------- kill and resume

#: How often each point is hit by one run of a 2-cell, 1-epoch study (3 steps an epoch):
#: 4 arrays + the sidecar; 3 steps × 2 trials; (epoch + final) × 2 trials + the parent.
HITS = {
    "cache.write": 5,
    "train.step": 6,
    "mlflow.log_metrics": 5,
    "mlflow.log_artifacts": 2,
    "study.tell.before": 2,
    "study.tell.after": 2,
}
KILL_SEED = 20261125
N_KILLS = 12


def kill_plan(seed: int = KILL_SEED, n: int = N_KILLS) -> list[tuple[str, int]]:
    """``n`` distinct (point, hit) pairs in a seeded order: every point at least ``n // 6``
    times, its hits drawn without replacement."""
    rng = random.Random(seed)
    names = sorted(HITS)
    counts = Counter(names * (n // len(names)) + rng.sample(names, n % len(names)))
    plan = [
        (name, hit) for name in names for hit in rng.sample(range(1, HITS[name] + 1), counts[name])
    ]
    rng.shuffle(plan)
    return plan


def test_kill_plan_is_seeded_and_covers_every_point() -> None:
    plan = kill_plan()
    assert plan == kill_plan() and len(set(plan)) == len(plan) == N_KILLS >= 10
    assert {name for name, _ in plan} == set(HITS) <= set(faults.POINTS)
    assert all(1 <= n <= HITS[name] for name, n in plan)


def test_kill_point_is_inert_unless_armed(monkeypatch) -> None:
    monkeypatch.delenv(faults.ENV_KILL_AT, raising=False)
    for _ in range(3):
        faults.kill_point("train.step")  # unset: nothing happens
    monkeypatch.setenv(faults.ENV_KILL_AT, "train.step:1000")
    faults.kill_point("train.step")  # armed for a later hit: nothing yet
    with pytest.raises(ValueError, match="unknown point 'nope'"):
        faults.parse_spec("nope:1")
    assert faults.parse_spec("cache.write:2, study.tell.after") == {
        "cache.write": 2,
        "study.tell.after": 1,
    }


@pytest.mark.slow
def test_sigkill_at_seeded_points_then_resume(zygote: Zygote, tmp_path: Path) -> None:
    """12 seeded kill points (data caching, mid-epoch, MLflow logging, either side of
    Optuna's tell); after each, re-running completes the study with every cell exactly
    once, a consistent MLflow store and a valid (or rebuilt) cache."""
    env = {"HOME": str(tmp_path)}  # params/tags must show the store as ~/mlruns
    survived: list[str] = []
    for i, (point, hit) in enumerate(kill_plan()):
        name = f"k{i:02d}-{point.replace('.', '-')}"
        study = write_study(tmp_path, name, search={"space": {"model.norm": ["batch", "none"]}})
        if point == "cache.write":  # the cache is written only when it is missing
            shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        log, kills = tmp_path / f"{name}.log", tmp_path / "kills.log"
        armed = env | {faults.ENV_KILL_AT: f"{point}:{hit}", faults.ENV_KILL_LOG: str(kills)}
        pid = zygote.start(["run", str(study), "--quiet"], log, armed)
        rc = zygote.wait(pid)
        assert rc == -9, f"{point}:{hit} did not kill the run (exit {rc}):\n{tail(log)}"
        assert kills.read_text().splitlines()[-1] == f"{point}:{hit} pid {pid}"

        rc = zygote.run(["run", str(study), "--quiet"], log, env)
        assert rc == 0, f"resume after {point}:{hit} failed (exit {rc}):\n{tail(log)}"
        summary = assert_study_consistent(study)
        check_cache(study)
        survived.append(f"{point}:{hit} → {summary}")
    print("\n".join(["kill points survived:", *survived]))
    assert len(survived) == N_KILLS

    # Across the whole store (12 studies): nothing RUNNING, no absolute home path recorded.
    client = MlflowClient(default_uri(load_config(study).tracking))
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], max_results=5000
    )
    assert len({r.data.tags[TAG_STUDY] for r in runs}) == N_KILLS
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    recorded = [v for r in runs for v in (*r.data.params.values(), *r.data.tags.values())]
    assert not [v for v in recorded if str(tmp_path) in v]
    assert any(v.startswith("~/mlruns") for v in recorded)  # tracking.root, masked


# ---------------------------------------------------------------- two studies, one store


@pytest.mark.slow
def test_two_studies_at_once_in_one_new_store_do_not_mix(zygote: Zygote, tmp_path: Path) -> None:
    """Both start on a store that does not exist yet (MLflow creates its tables on first
    use: a race, now serialised) and share the data cache being built."""
    alpha = write_study(tmp_path, "alpha", search={"space": {"model.norm": ["batch", "none"]}})
    beta = write_study(tmp_path, "beta", search={"space": {"model.act": ["relu", "tanh", "gelu"]}})
    logs = [tmp_path / "alpha.log", tmp_path / "beta.log"]
    pids = [
        zygote.start(["run", str(path), "--quiet"], log)
        for path, log in zip((alpha, beta), logs, strict=True)
    ]
    rcs = [zygote.wait(pid) for pid in pids]
    assert rcs == [0, 0], "\n".join(tail(log) for log in logs)
    assert assert_study_consistent(alpha) == {"complete": 2, "killed_runs": 0, "runs": 3}
    assert assert_study_consistent(beta) == {"complete": 3, "killed_runs": 0, "runs": 4}
    # One Optuna storage, two studies, each with its own trials and runs.
    cfg_a, cfg_b = load_config(alpha), load_config(beta)
    storage = open_storage(storage_url(cfg_a))
    assert storage_url(cfg_a) == storage_url(cfg_b)
    run_ids = {}
    for cfg in (cfg_a, cfg_b):
        trials = open_study(cfg, storage).get_trials()
        run_ids[cfg.name] = {t.user_attrs[A_RUN] for t in trials}
    client = MlflowClient(default_uri(cfg_a.tracking))
    for cfg in (cfg_a, cfg_b):
        exp = client.get_experiment_by_name(cfg.name)
        nested = client.search_runs(
            [exp.experiment_id], f"tags.`{TAG_KIND}` = 'trial'", max_results=100
        )
        assert {r.info.run_id for r in nested} == run_ids[cfg.name]
    assert not run_ids["alpha"] & run_ids["beta"]


# ---------------------------------------------------------------------- out of memory


@pytest.mark.slow
def test_out_of_memory_fails_the_trial_with_a_reason_and_the_study_goes_on(
    zygote: Zygote, tmp_path: Path
) -> None:
    """Under a memory cap (RLIMIT_AS: what is mapped + 3 GiB), a 512 px cell cannot train
    (its activations need several GiB) while the 32 px cell runs as usual."""
    study = write_study(
        tmp_path,
        "oom",
        data={
            "source": "synthetic",
            "image_size": 32,
            "synthetic": {"n_images": 40, "images_per_subject": 1, "seed": 0},
        },
        search={"space": {"data.image_size": [512, 32]}},
    )
    log = tmp_path / "oom.log"
    rc = zygote.run(["run", str(study), "--quiet"], log, as_extra_mb=3072)
    assert rc == 0, tail(log)
    cfg = load_config(study)
    trials = open_study(cfg, open_storage(storage_url(cfg))).get_trials()
    by_size = {t.user_attrs["params"]["data.image_size"]: t for t in trials}
    assert by_size[32].state == TrialState.COMPLETE, tail(log)
    big = by_size[512]
    assert big.state == TrialState.FAIL, tail(log)
    reason = big.user_attrs[A_REASON]
    assert "out of memory" in reason and "512 px" in reason and "lower train.batch_size" in reason
    client = MlflowClient(default_uri(cfg.tracking))
    run = client.get_run(big.user_attrs[A_RUN])
    assert run.info.status == "FAILED" and run.data.tags[TAG_REASON] == reason
    assert "Traceback" not in log.read_text()  # a known failure: one line, no traceback
    # A re-run does not retry it (the same cell would run out of memory again).
    assert zygote.run(["run", str(study), "--quiet"], log, as_extra_mb=3072) == 0
    again = open_study(cfg, open_storage(storage_url(cfg))).get_trials()
    assert Counter(t.state for t in again) == {TrialState.COMPLETE: 1, TrialState.FAIL: 1}


def test_out_of_memory_is_recognised_on_cpu_and_cuda() -> None:
    """The three shapes an OOM takes (CUDA's OutOfMemoryError, the CPU allocator's plain
    RuntimeError, Python's MemoryError) give one fail reason; other errors stay errors."""
    import torch

    from agelab.config import validate
    from agelab.objective import is_out_of_memory, out_of_memory_reason

    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)")
    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 469762048 bytes. Error code 12 (Cannot allocate memory)"
    )
    assert all(is_out_of_memory(e) for e in (cuda, cpu, MemoryError()))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocation failure
    reason = out_of_memory_reason(cpu, validate({"name": "x"}))
    assert reason.startswith("out of memory: DefaultCPUAllocator: can't allocate memory")
    assert "(batch 64, 64 px, resnet10t); lower train.batch_size" in reason
    assert out_of_memory_reason(cuda, validate({"name": "x"})).startswith(
        "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    )


# ------------------------------------------------------------ full or read-only store

STORE_PROBE = r"""
import contextlib, io, json, sys, time
import agelab.study, agelab.tracking, mlflow  # noqa: F401  (imports are not timed below)
from agelab import cli
out = {}
for name, path in zip(sys.argv[1::2], sys.argv[2::2]):
    err, std = io.StringIO(), io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        rc = cli.main(["run", path, "--quiet"])
    out[name] = {"rc": rc, "err": err.getvalue(), "out": std.getvalue(), "s": time.time() - t0}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_full_and_read_only_store_fail_before_training(tmp_path: Path) -> None:
    """A real full disk and a real read-only filesystem (tmpfs mounts in a private mount
    namespace): `agelab run` stops at the write probe with the folder and what to do."""
    why = why_no_mount_namespace()
    if why:
        pytest.skip(why)
    full, ro = tmp_path / "full", tmp_path / "ro"
    args = []
    for name, root in (("full", full), ("ro", ro)):
        (root / "mlruns").mkdir(parents=True)
        args += [name, str(write_study(root, name))]
    script = (
        'mount -t tmpfs -o size=1m tmpfs "$1" && '
        '(dd if=/dev/zero of="$1/filler" bs=4k 2>/dev/null; true) && '
        'mount -t tmpfs -o ro,size=1m tmpfs "$2" && shift 2 && exec "$@"'
    )
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]
    cmd += [str(full / "mlruns"), str(ro / "mlruns"), sys.executable, "-c", STORE_PROBE, *args]
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    for name, errno_text in (("full", "No space left on device"), ("ro", "Read-only file system")):
        res = got[name]
        message = res["err"]
        assert res["rc"] == 2, res
        assert f"cannot write to the tracking folder {tmp_path / name / 'mlruns'}" in message
        assert errno_text in message and "Free some space or fix its permissions" in message
        assert "Traceback" not in message and "trial" not in res["out"]  # nothing trained
        assert res["s"] < 10, res  # before any data or training work


@pytest.mark.slow
def test_file_size_limit_store_fails_before_training(zygote: Zygote, tmp_path: Path) -> None:
    """Where mounts are not allowed: RLIMIT_FSIZE makes every write past 16 KiB fail (EFBIG),
    which the 64 KiB write probe meets before anything else."""
    study = write_study(tmp_path, "fsize")
    log = tmp_path / "fsize.log"
    assert zygote.run(["run", str(study), "--quiet"], log, fsize=16384) == 2, tail(log)
    text = log.read_text()
    assert f"cannot write to the tracking folder {tmp_path / 'mlruns'}: File too large" in text
    assert "Free some space" in text and "Traceback" not in text
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # stopped before the store

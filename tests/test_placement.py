"""GPU placement of local workers (``--gpus``, ``--workers-per-gpu``), the per-trial device
records, and MLflow system metrics on trial runs.

Without CUDA, placement is tested end to end through a parent ``CUDA_VISIBLE_DEVICES`` (what
a scheduler grants a job): the real CLI spawns real workers, and each trial run records the
``CUDA_VISIBLE_DEVICES`` its worker process was given."""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from agelab.cli import main
from agelab.config import validate
from agelab.errors import UserError
from agelab.study import run_study
from agelab.study.placement import (
    describe,
    parse_visible,
    placement_for,
    plan_placement,
    visible_gpus,
)
from agelab.tracking import default_uri
from helpers.studies import tiny_study


def gpus_of(placement: list[dict[str, str]]) -> list[str | None]:
    return [p.get("CUDA_VISIBLE_DEVICES") for p in placement]


# ------------------------------------------------------------------ the pure function


def test_workers_round_robin_over_visible_gpus() -> None:
    assert gpus_of(plan_placement(5, ["0", "1"])) == ["0", "1", "0", "1", "0"]
    assert gpus_of(plan_placement(2, ["0", "1", "2", "3"])) == ["0", "1"]
    assert gpus_of(plan_placement(None, ["0", "1"])) == ["0"]  # no flags: one worker


def test_gpus_restrict_and_default_to_one_worker_each() -> None:
    assert gpus_of(plan_placement(None, ["0", "1", "2", "3"], gpus=[1, 3])) == ["1", "3"]
    assert gpus_of(plan_placement(3, ["0", "1", "2", "3"], gpus=[2])) == ["2", "2", "2"]


def test_workers_per_gpu_sets_the_count_and_caps_it() -> None:
    visible = ["0", "1"]
    assert gpus_of(plan_placement(None, visible, per_gpu=2)) == ["0", "1", "0", "1"]
    assert gpus_of(plan_placement(3, visible, per_gpu=2)) == ["0", "1", "0"]
    assert gpus_of(plan_placement(None, visible, gpus=[1], per_gpu=3)) == ["1", "1", "1"]
    with pytest.raises(UserError, match=r"--workers 5 with --workers-per-gpu 2 needs 3 GPUs"):
        plan_placement(5, visible, per_gpu=2)


def test_parent_visible_list_is_what_workers_get() -> None:
    """Under CUDA_VISIBLE_DEVICES=3,5 the ids are torch's (0, 1), the entries the parent's."""
    visible = visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5"})
    assert visible == ["3", "5"]
    assert gpus_of(plan_placement(None, visible, gpus=[1])) == ["5"]
    uuids = visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-8a1b, MIG-4c2d"})
    assert gpus_of(plan_placement(3, uuids)) == ["GPU-8a1b", "MIG-4c2d", "GPU-8a1b"]


def test_visible_gpus_reads_cuda_visible_devices_as_cuda_does() -> None:
    assert parse_visible("0,1,2") == ["0", "1", "2"]
    assert parse_visible("") == [] and parse_visible("-1") == []
    assert parse_visible("0,-1,2") == ["0"]  # CUDA stops at the first invalid entry
    assert visible_gpus({}) == [str(i) for i in range(torch.cuda.device_count())]


def test_without_gpus_nothing_is_set_and_gpu_flags_are_refused() -> None:
    assert plan_placement(3, []) == [{}, {}, {}]
    assert plan_placement(None, []) == [{}]
    assert describe(plan_placement(3, [])) == ""
    with pytest.raises(UserError, match=r"^--gpus: no GPU is visible"):
        plan_placement(None, [], gpus=[0])
    with pytest.raises(UserError, match=r"^--workers-per-gpu: no GPU is visible"):
        plan_placement(2, [], per_gpu=2)


def test_bad_gpu_ids_name_the_flag_and_what_is_visible() -> None:
    with pytest.raises(UserError) as info:
        plan_placement(None, ["0", "1"], gpus=[0, 4])
    assert str(info.value).startswith("--gpus 0,4: GPU 4 is not visible")
    assert "2 visible GPU(s), ids 0-1" in str(info.value)
    with pytest.raises(UserError, match=r"--gpus 1,1 lists a GPU twice"):
        plan_placement(None, ["0", "1"], gpus=[1, 1])
    with pytest.raises(UserError, match=r"--workers-per-gpu 0"):
        plan_placement(None, ["0"], per_gpu=0)
    with pytest.raises(UserError, match=r"--workers 0"):
        plan_placement(0, ["0"])


def test_a_cpu_study_takes_no_gpu(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert placement_for("cpu", 2) == [{}, {}]
    assert gpus_of(placement_for("auto", 2)) == ["0", "1"]
    with pytest.raises(UserError, match=r"^--gpus: this study trains on the CPU"):
        placement_for("cpu", None, gpus=[0])


def test_describe_says_which_worker_has_which_gpu() -> None:
    line = describe(plan_placement(3, ["5", "7"]))
    assert line.startswith("3 worker(s) on GPU(s) 5, 7 (w0→5, w1→7, w2→5")


# ------------------------------------------------------------------------- the CLI


def study_file(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tiny_study(tmp_path, **sections)))
    return path


def test_cli_gpu_flags_fail_in_one_line_before_any_work(tmp_path: Path, monkeypatch, capsys):
    path = study_file(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["run", str(path), "--gpus", "0,x"])
    assert info.value.code == 2
    assert "argument --gpus: '0,x' is not a comma-separated list" in capsys.readouterr().err

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert main(["run", str(path), "--gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "agelab: --gpus 2: GPU 2 is not visible; this machine shows 2 visible GPU(s)" in err
    assert "CUDA_VISIBLE_DEVICES=3,5" in err

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a machine that shows no GPU
    assert main(["run", str(path), "--gpus", "0"]) == 2
    assert "agelab: --gpus: no GPU is visible on this machine" in capsys.readouterr().err
    assert main(["run", str(path), "--workers-per-gpu", "2"]) == 2
    assert "agelab: --workers-per-gpu: no GPU is visible" in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists()  # refused before any store was touched


def trial_runs(cfg) -> list:
    client = MlflowClient(default_uri(cfg.tracking))
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return [r for r in runs if r.data.tags.get("agelab.run_kind") == "trial"]


@pytest.mark.slow
def test_cli_places_each_worker_process_on_its_gpu(tmp_path: Path, monkeypatch, capfd) -> None:
    """`agelab run --gpus 0,2` under a parent CUDA_VISIBLE_DEVICES=5,7,9: two real worker
    processes, one given 5 and one given 9, each recording it on every trial it ran."""
    two_cells = {"space": {"model.norm": ["batch", "none"]}}
    path = study_file(tmp_path, search=two_cells, report={"auto": False})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7,9")
    # 2 trials, 2 workers: --n-trials 2 caps each worker at 1, so both run one.
    assert main(["run", str(path), "--gpus", "0,2", "--n-trials", "2", "--quiet"]) == 0
    out = capfd.readouterr().out
    assert "2 worker(s) on GPU(s) 5, 9 (w0→5, w1→9;" in out

    runs = trial_runs(validate(tiny_study(tmp_path, search=two_cells)))
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    by_pid = defaultdict(set)
    for r in runs:
        by_pid[r.data.tags["agelab.worker_pid"]].add(r.data.tags["agelab.cuda_visible_devices"])
    assert sorted(v for values in by_pid.values() for v in values) == ["5", "9"]
    assert all(len(values) == 1 for values in by_pid.values())  # one GPU per process
    if not torch.cuda.is_available():  # 5 and 9 are no devices here: trained on the CPU
        assert {r.data.tags["agelab.gpu"] for r in runs} == {"cpu"}
    # Off by default: no system metrics, and no CUDA memory on the CPU.
    assert not any(k.startswith("system/") for r in runs for k in r.data.metrics)


# ---------------------------------------------------------------------- what a trial records


@pytest.mark.slow
def test_system_metrics_sampled_on_trial_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    raw = tiny_study(
        tmp_path,
        search={"space": {"model.norm": ["batch"]}},
        tracking={"root": str(tmp_path / "mlruns"), "log_figures": False, "system_metrics": True},
        report={"auto": False},
    )
    cfg = validate(raw)
    assert run_study(cfg, quiet=True).counts["COMPLETE"] == 1

    client = MlflowClient(default_uri(cfg.tracking))
    exp = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([exp.experiment_id])
    (trial,) = [r for r in runs if r.data.tags["agelab.run_kind"] == "trial"]
    (parent,) = [r for r in runs if r.data.tags["agelab.run_kind"] == "study"]
    cpu = client.get_metric_history(trial.info.run_id, "system/cpu_utilization_percentage")
    assert cpu and all(0 <= m.value <= 100 for m in cpu)
    assert "system/system_memory_usage_megabytes" in trial.data.metrics
    assert not any(k.startswith("system/") for k in parent.data.metrics)  # trial runs only
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    gpu = trial.data.tags["agelab.gpu"]
    if torch.cuda.is_available():
        assert gpu.startswith("0 (") and "peak_cuda_memory_gb" in trial.data.metrics
    else:
        assert gpu == "cpu" and "peak_cuda_memory_gb" not in trial.data.metrics


@pytest.mark.gpu
def test_cuda_trial_records_its_gpu_and_peak_memory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    raw = tiny_study(tmp_path, train={"device": "cuda"}, report={"auto": False})
    cfg = validate(raw)
    # Two workers on the first GPU, in their own processes, as --gpus 0 --workers-per-gpu 2.
    summary = run_study(cfg, workers=None, gpus=[0], workers_per_gpu=2, quiet=True)
    assert summary.counts["COMPLETE"] == 4
    runs = trial_runs(cfg)
    name = torch.cuda.get_device_name(0)
    assert {r.data.tags["agelab.gpu"] for r in runs} == {f"0 ({name})"}
    assert {r.data.tags["agelab.cuda_visible_devices"] for r in runs} == {"0"}
    assert all(0 < r.data.metrics["peak_cuda_memory_gb"] < 100 for r in runs)

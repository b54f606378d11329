"""Benchmarks (``agelab bench``) at tiny sizes: well-formed results, real baselines.

No timing assertions: the ratios depend on the machine and its load.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from agelab import bench
from agelab.bench import common, report
from agelab.bench.data import bench_cache, bench_generate
from agelab.bench.overhead import bench_tracking
from agelab.bench.studies import bench_memory
from agelab.bench.training import bench_streaming, bench_training, naive_loader

TINY = {"image_size": 16, "n_images": 80, "epochs": 1, "log_figures": False}


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def _summary_ok(s: dict) -> bool:
    return all(_positive(s[k]) for k in ("min", "median", "max")) and s["min"] <= s["max"]


@pytest.fixture
def no_mlflow_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    # The baselines set MLflow's global URI (and so the variable); it must be restored.
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_training_fit_bare_and_naive_pipeline(no_mlflow_env, one_torch_thread):
    r = bench_training(
        "mobilenetv3_small_100",
        image_size=32,
        n_images=32,
        batch_size=16,
        repeats=1,
        naive_workers=1,
        device="cpu",
        verbose=False,
    )
    assert r["device"] == "cpu" and r["threads"] >= 1 and r["n_images"] == 32
    for key in ("fit_images_per_second", "bare_images_per_second", "naive_images_per_second"):
        assert _summary_ok(r[key]), key
    for key in ("ratio", "ratio_best", "naive_ratio", "naive_ratio_best"):
        assert _positive(r[key]), key
    # The naive loop really read the JPEG files, in DataLoader worker processes, and logged
    # one MLflow metric value per step: warm-up + 1 repeat, 2 steps of 16 images each.
    naive = r["naive"]
    assert naive["files_read"] == 2 * 32
    assert naive["files_read_in_workers"] == naive["files_read"]
    assert naive["mlflow_metric_values_logged"] == 2 * 2


def test_streaming_vs_resident_row(one_torch_thread):
    r = bench_streaming(
        "mobilenetv3_small_100", image_size=32, n_images=32, batch_size=16, repeats=1,
        device="cpu", verbose=False,
    )  # fmt: skip
    assert r["paths"] == {"streaming": "streaming", "resident": "resident-host"}
    assert r["shards"] == 4 and r["n_images"] == 32
    assert _summary_ok(r["streaming_images_per_second"])
    assert _summary_ok(r["resident_images_per_second"])
    assert _positive(r["ratio"]) and _positive(r["ratio_best"])
    row = report._streaming_row(r, cuda=False)
    assert "memory-mapped shards" in row["benchmark"] and row["goal"] == "≥ 0.90"
    assert row["met"] == ("pass" if r["ratio_best"] >= 0.9 else "MISS")


def test_naive_loader_reads_image_files(tmp_path: Path):
    from PIL import Image

    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(path)
        paths.append(str(path))
    loader = naive_loader(paths, [1.0, 2.0, 3.0, 4.0], image_size=16, batch_size=2, workers=1)
    assert isinstance(loader.dataset, bench.training.FileImages) and loader.num_workers == 1
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(2, 3, 16, 16)] * 2  # resized by transforms
    assert loader.dataset.reads.value == 4 and loader.dataset.reads_in_workers.value == 4
    Path(paths[0]).unlink()
    with pytest.raises(FileNotFoundError):
        loader.dataset[0]  # nothing cached: every access opens the file


def test_tracker_counts_real_mlflow_calls(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from agelab.config import TrackingConfig
    from agelab.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(TrackingConfig(root=tmp_path, uri=uri), "counted")
    assert tracker.calls >= 1 and tracker.call_seconds > 0  # the experiment lookup/creation
    calls, seconds = tracker.calls, tracker.call_seconds
    run_id = tracker.start_run("r", tags={"a": 1})
    tracker.log_params(run_id, {"p": 1, "q": "x"})
    tracker.log_metrics(run_id, {"m": 0.5, "n": 2.0}, step=1)
    tracker.end_run(run_id)
    assert tracker.calls - calls == 4  # one batched call each
    assert tracker.call_seconds > seconds
    run = MlflowClient(uri).get_run(run_id)  # the calls reached the SQLite store
    assert run.data.params == {"p": "1", "q": "x"} and run.data.metrics == {"m": 0.5, "n": 2.0}
    assert run.info.status == "FINISHED"


def test_tracking_overhead_and_mlflow_callback(tmp_path: Path, no_mlflow_env, one_torch_thread):
    cfg = common.bench_config(
        tmp_path / "store", "t-overhead", cache_dir=tmp_path / "cache", seeds=[0], **TINY
    )
    r = bench_tracking(cfg, tmp_path, verbose=False)
    ours, theirs = r["agelab"], r["mlflow_callback"]
    for side in (ours, theirs):
        assert _positive(side["trial_seconds"]) and _positive(side["mlflow_seconds"])
        assert 0 < side["share"] < 1
    # Counted calls: create run, params, census tags, per-epoch metrics, final metrics, tags,
    # artifacts, state tag, end — at least these, all against the SQLite file.
    assert ours["mlflow_calls"] >= 8
    assert (tmp_path / "store" / "mlflow.db").is_file()
    rec = ours["records"]
    assert rec["params"] > 20 and rec["metric_keys"] > 10 and rec["artifacts"] >= 4
    assert rec["metric_values"] >= rec["metric_keys"]
    cb = theirs["records"]
    assert cb["params"] == 3 and cb["metric_keys"] == 1 and cb["artifacts"] == 0
    assert set(ours["params"]) == {"model.norm", "model.act", "seed"}


ONE_CELL = {"model.norm": ["batch"], "model.act": ["relu"]}


def test_bench_cache_small(tmp_path: Path):
    out = bench_cache(n=64, size=16, workdir=tmp_path)
    assert set(out) >= {"build_s", "reload_s", "decode_jpeg_s", "cache_mb"}
    assert out["n"] == 64 and out["reload_s"] >= 0
    assert list(tmp_path.iterdir()) == []  # its working folder is removed


def test_bench_generate():
    assert bench_generate(100, 32) > 0


@pytest.mark.slow
def test_memory_across_trials_in_one_worker_process(tmp_path: Path):
    mem = bench_memory(
        tmp_path, cache_dir=tmp_path / "cache", n_trials=2, verbose=False, space=ONE_CELL, **TINY
    )
    assert mem["trials"] == 2 and len(mem["per_trial"]) == 2
    assert all(r["state"] == "COMPLETE" for r in mem["per_trial"])
    assert _positive(mem["peak_rss_mb_first"]) and _positive(mem["peak_rss_mb_last"])
    # Peak RSS never falls; growth is measured after the first trial.
    assert mem["peak_rss_mb_last"] >= mem["peak_rss_mb_first"] and mem["growth"] >= 0
    assert math.isfinite(mem["rss_growth"]) and mem["growth_second_half"] >= 0
    assert mem["half_trial"] == 1 and mem["last_peak_increase_trial"] in (1, 2)
    assert (tmp_path / "bench-memory" / "mlflow.db").is_file()  # its own store, not mlruns/


def test_report_rows_and_markdown():
    s = {"min": 1.0, "median": 2.0, "max": 3.0, "all": [1.0, 2.0, 3.0]}
    results = {
        "date": "2026-01-01",
        "command": "agelab bench --quick",
        "quick": True,
        "seconds": 90.0,
        "machine": {
            "cpu": "X",
            "cpu_count": 2,
            "memory_gib": 8,
            "gpu": None,
            "device": "cpu",
            "torch_threads": 2,
            "torch": "2",
        },
        "load_average": {"start": [0.1, 0.1, 0.1], "end": [0.5, 0.2, 0.1]},
        "others_load_cores": 0.1,
        "section_seconds": {"training": 30.0},
        "training": [
            {
                "backbone": "b",
                "image_size": 64,
                "batch_size": 64,
                "n_images": 512,
                "fit_images_per_second": s,
                "bare_images_per_second": s,
                "naive_images_per_second": s,
                "ratio": 0.85,
                "ratio_best": 0.95,
                "naive_ratio": 2.0,
                "naive_ratio_best": 2.5,
                "naive": {"workers": 2, "source_size": 64},
            }
        ],
        "cache": {
            "n": 2000,
            "size": 64,
            "build_s": 0.1,
            "reload_s": 0.05,
            "dataset_reload_s": 0.1,
            "decode_jpeg_s": 1.0,
        },
        "memory": {
            "trials": 20,
            "config": "c",
            "peak_rss_mb_first": 100.0,
            "peak_rss_mb_last": 110.0,
            "growth": 0.1,
            "growth_second_half": 0.0,
            "half_trial": 10,
            "last_peak_increase_trial": 5,
        },
    }
    rows = report.rows(results)
    met = [(r["goal"], r["met"]) for r in rows]
    assert ("≥ 0.90", "pass") in met and ("≥ 3× (CPU)", "MISS") in met
    assert ("≤ 5 %", "MISS") in met
    assert any(r["goal"].startswith("< 1 s per 10,000") and r["met"] == "pass" for r in rows)
    results["table"] = rows
    md = report.markdown(results)
    assert "2026-01-01" in md and "make bench-quick" in md and "2 cores" in md
    assert md.count("\n| ") == len(rows) + 1  # header + one line per row


@pytest.mark.slow
def test_main_writes_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_mlflow_env):
    tiny = {
        "training": [
            {
                "backbone": "mobilenetv3_small_100",
                "image_size": 32,
                "n_images": 32,
                "batch_size": 16,
                "repeats": 1,
                "naive_workers": 1,
            },
        ],
        "gpu": {"n_images": 64, "repeats": 1},
        "streaming": {"image_size": 32, "n_images": 32, "batch_size": 16, "repeats": 1},
        "data_n": 64,
        "tracking": {**TINY, "seeds": [0]},
        "throughput": {**TINY, "space": ONE_CELL, "n_trials": 2},
        "memory": None,  # from the one-worker throughput run, as in quick mode
    }
    monkeypatch.setattr(bench, "QUICK", tiny)
    assert bench.main(quick=True, out_dir=tmp_path / "out") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for key in ("training", "streaming", "synthetic", "cache", "tracking", "study_throughput",
                "memory"):  # fmt: skip
        assert key in results, key
    runs = results["study_throughput"]["runs"]
    assert [r["workers"] for r in runs] == [1, 2]
    for run in runs:  # each worker count in its own fresh process and store
        assert run["trials"] == 2 and _positive(run["trials_per_hour"])
        assert run["steady_trials_per_hour"] >= run["trials_per_hour"]  # start-up excluded
        assert 0 < run["trial_span_seconds"] <= run["seconds"]
        assert _positive(run["mean_trial_seconds"])
    assert _positive(results["study_throughput"]["scaling"])
    assert _positive(results["study_throughput"]["steady_scaling"])
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch_threads"] >= 1
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.count("\n| ") == len(results["table"]) + 1
    assert {r["#"] for r in results["table"]} == {"1", "2", "3", "4", "5"}
    assert results["memory"]["trials"] == 2

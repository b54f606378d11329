"""Benchmarks (``agelab bench [--quick]``, ``make bench`` / ``make bench-quick``).

Every comparison runs side by side in one process run (warm-up first, several repeats,
min/median reported), and the absolute numbers are written with the machine, the device and
the thread count. What is measured, each in its own module:

1. training throughput (:mod:`.training`): ``fit`` vs a bare loop on the same resident
   tensors (goal ≥ 0.90) and vs the naive tutorial pipeline (goal ≥ 3× on CPU); on CUDA also
   fp32 / bf16 / channels_last / ``torch.compile`` variants; ``fit`` streaming from
   memory-mapped shards vs resident (goal ≥ 0.90 on CPU);
2. tracking overhead (:mod:`.overhead`): share of a real trial's wall time spent in MLflow
   calls (goal ≤ 2 %), and the same trial logged by optuna-integration's ``MLflowCallback``;
3. data (:mod:`.data`): synthetic generation, cache build and reload vs decoding the same
   JPEG files (reload goal < 1 s for 10,000 images at 64 px);
4. study throughput (:mod:`.studies`): trials per hour with 1 and 2 workers, the scaling;
5. memory (:mod:`.studies`): peak RSS across 20 consecutive trials in one worker (goal:
   growth ≤ 5 % after the first trial).

:func:`main` writes ``results.json`` and ``results.md`` (the table for the README) and prints
the table; the output of the studies and trials themselves goes to ``<out>/logs/``.

The baselines use mlflow and optuna directly (``mlflow.log_metric`` in the tutorial loop,
``optuna_integration.MLflowCallback``) — the one place outside :mod:`agelab.tracking` and
:mod:`agelab.study` that does, on purpose.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from agelab.bench import report
from agelab.bench.common import (
    bench_config,
    captured,
    cpu_seconds,
    load_average,
    machine,
    others_load,
    say,
)
from agelab.bench.data import bench_cache, bench_generate
from agelab.bench.overhead import bench_tracking
from agelab.bench.training import (
    bench_fit_vs_bare,
    bench_gpu_variants,
    bench_streaming,
    bench_training,
)

__all__ = [
    "FULL",
    "QUICK",
    "bench_fit_vs_bare",
    "bench_gpu_variants",
    "bench_streaming",
    "bench_training",
    "main",
]

#: ``make bench-quick``: under 2 minutes on 2 idle CPU cores; every comparison, small sizes.
QUICK: dict[str, Any] = {
    "training": [
        {"backbone": "mobilenetv3_small_100", "image_size": 64, "n_images": 256, "repeats": 3},
    ],
    "gpu": {"n_images": 1024, "repeats": 2},
    # bigger than memory: fit streaming from memory-mapped shards vs the same images resident
    "streaming": {"backbone": "mobilenetv3_small_100", "image_size": 64, "n_images": 192},
    "data_n": 2_000,
    "tracking": {"n_images": 480, "epochs": 2, "seeds": [0]},  # demo trial at 48 px, shorter
    # 20 tiny trials: the one-worker run also gives the memory readings (memory: None).
    "throughput": {
        "image_size": 16,
        "n_images": 80,
        "epochs": 1,
        "log_figures": False,
        "n_trials": 20,
    },
    "memory": None,
    "memory_trials": 20,
}

#: ``make bench``: a small and a mid backbone at 64 and 128 px (and the naive pipeline once
#: more on 200 px files, as UTKFace ships them), 10,000 images for the data rows, the demo
#: trial as is for the tracking share, the demo grid at 2 epochs (instead of 6) for
#: throughput, 20 small trials with figures for memory.
FULL: dict[str, Any] = {
    "training": [
        {"backbone": "mobilenetv3_small_100", "image_size": 64, "n_images": 512, "repeats": 3},
        {"backbone": "mobilenetv3_small_100", "image_size": 128, "n_images": 256, "repeats": 3},
        {"backbone": "resnet18", "image_size": 64, "n_images": 256, "repeats": 3},
        {"backbone": "resnet18", "image_size": 128, "n_images": 128, "repeats": 3},
        {
            "backbone": "mobilenetv3_small_100",
            "image_size": 64,
            "n_images": 512,
            "repeats": 3,
            "naive_source_size": 200,  # files as UTKFace ships them (200×200), resized per epoch
        },
    ],
    "gpu": {"n_images": 4096, "repeats": 3},
    "streaming": {"backbone": "mobilenetv3_small_100", "image_size": 64, "n_images": 512},
    "data_n": 10_000,
    "tracking": {},
    "throughput": {"epochs": 2},
    "memory": {"image_size": 32, "n_images": 320, "epochs": 1, "log_figures": True},
    "memory_trials": 20,
}


def main(quick: bool = False, out_dir: Path = Path("bench")) -> int:
    """Run every benchmark, print the table, write ``results.json`` / ``results.md``."""
    plan = QUICK if quick else FULL
    out_dir = Path(out_dir)
    logs = out_dir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cpu0 = cpu_seconds()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": quick,
        "command": f"agelab bench{' --quick' if quick else ''}",
        "machine": machine(),
        "load_average": {"start": load_average()},
        "plan": plan,
        "section_seconds": {},
    }
    m = results["machine"]
    say(
        f"{results['command']}: {m['cpu']}, {m['cpu_count']} cores, "
        f"{m['torch_threads']} torch threads, device {m['gpu'] or 'cpu'} (logs in {logs})"
    )
    with tempfile.TemporaryDirectory(prefix="agelab-bench-") as tmp_name:
        _run_sections(plan, results, Path(tmp_name), logs)
    results["seconds"] = time.perf_counter() - t_start
    results["load_average"]["end"] = load_average()
    results["others_load_cores"] = others_load(cpu0, results["seconds"])
    results["notes"] = notes(results)
    results["table"] = report.rows(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = report.markdown(results)
    (out_dir / "results.md").write_text(md)
    say("")
    say(md.rstrip())
    say(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 0


@contextlib.contextmanager
def _section(results: dict[str, Any], name: str, log: Path) -> Iterator[None]:
    """Time a section into ``results["section_seconds"]`` and send its output to ``log``."""
    t0 = time.perf_counter()
    try:
        with captured(log):
            yield
    finally:
        results["section_seconds"][name] = round(time.perf_counter() - t0, 1)


def _run_sections(plan: dict[str, Any], results: dict[str, Any], tmp: Path, logs: Path) -> None:
    """The benchmarks of ``plan``, in an order that keeps the largest working set (the data
    rows) away from the studies; their results go into ``results``."""
    # Imported here: ``python -m agelab.bench.studies`` (the study process) imports this
    # package first, and runpy warns when the package has already imported that module.
    from agelab.bench.studies import (
        bench_memory,
        bench_study_throughput,
        memory_summary,
        say_memory,
    )

    cache_dir = tmp / "data-cache"
    with _section(results, "training", logs / "training.log"):
        results["training"] = [bench_training(**spec) for spec in plan["training"]]
        if plan.get("streaming"):
            results["streaming"] = bench_streaming(**plan["streaming"])
        if torch.cuda.is_available():
            results["gpu"] = bench_gpu_variants(**plan["gpu"])
    with _section(results, "data", logs / "data.log"):
        results.update(_data_rows(plan["data_n"], tmp))
    with _section(results, "tracking", logs / "tracking.log"):
        cfg = bench_config(
            tmp / "tracking", "bench-tracking", cache_dir=cache_dir, **plan["tracking"]
        )
        results["tracking"] = bench_tracking(cfg, tmp / "tracking")
    with _section(results, "study_throughput", logs / "throughput.log"):
        results["study_throughput"] = th = bench_study_throughput(
            tmp / "throughput",
            cache_dir=cache_dir,
            log=logs / "throughput-runs.log",
            **plan["throughput"],
        )
    if plan["memory"] is None:  # quick: the one-worker throughput run's trials
        results["memory"] = memory_summary(th["runs"][0]["per_trial"], th["config"])
        say_memory(results["memory"])
        return
    with _section(results, "memory", logs / "memory.log"):
        results["memory"] = bench_memory(
            tmp / "memory",
            cache_dir=cache_dir,
            n_trials=plan["memory_trials"],
            log=logs / "memory-run.log",
            **plan["memory"],
        )


def _data_rows(n: int, workdir: Path) -> dict[str, Any]:
    """Synthetic generation and the cache, ``n`` images at 64 px."""
    ips = bench_generate(n=n, size=64)
    say(f"synthetic generation: {ips:.0f} images/s ({n:,} at 64px)")
    cache = bench_cache(n=n, size=64, workdir=workdir)
    say(
        f"cache: build {cache['build_s']:.2f} s, dataset load from cache "
        f"{cache['dataset_reload_s']:.2f} s vs decoding the JPEGs "
        f"{cache['decode_jpeg_s']:.2f} s"
    )
    return {"synthetic": {"n": n, "size": 64, "images_per_second": ips}, "cache": cache}


def notes(results: dict[str, Any]) -> list[str]:
    """What the reader needs to interpret the table."""
    out = [
        "Every ratio compares runs taken in the same process run, interleaved, after a "
        "warm-up. Throughput cells: median (and best) of the repeats; ratios: best-of (and "
        "median). Training goals are judged on the best-of ratio, the least disturbed "
        "measurement (other processes can only slow a run down), as `timeit` advises.",
        "Naive pipeline: JPEG files read with PIL in "
        "`Dataset.__getitem__`, torchvision `Resize`/`ToTensor`/`Normalize`, a shuffling "
        "`DataLoader` (workers restarted every epoch, the default), default AdamW, "
        "`loss.item()` and `mlflow.log_metric` every step. No augmentation in any loop.",
    ]
    if results["machine"]["device"] != "cuda":
        out.append(
            "GPU figures pending: this machine has no CUDA device; on one, the same command "
            "adds bf16 / channels_last / `torch.compile` rows and the GPU naive ratio."
        )
    if results.get("streaming"):
        out.append(
            "Streaming: `fit` on a dataset bigger than `data.max_resident_gb` reads its batches "
            "from memory-mapped shard files, gathered a few batches ahead on a thread; here "
            "the shards sit in the page cache after the warm-up, so the row measures the "
            "streaming path's own cost, not the disk's."
        )
    if results.get("tracking"):
        out.append(
            "optuna-integration's `MLflowCallback` (deprecated since optuna-integration 4.9) "
            "logs once per trial, after it ends: the trial's params, its value and a few tags; "
            "agelab logs per-epoch metrics, the config, diagnostics and artifacts."
        )
    if results["quick"]:
        out.append(
            "Quick mode: one small backbone at 64 px, few images and repeats, 2,000 images "
            "for the data rows (goal scaled linearly), a short trial for the tracking share "
            "(MLflow's per-trial cost is fixed, so its share falls as trials get longer), tiny "
            "trials for throughput (worker start-up weighs on the 2-worker run) and memory. "
            "`make bench` runs the full sizes."
        )
    return out


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv[1:]))

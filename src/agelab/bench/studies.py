"""Study throughput (trials per hour with 1 and 2 workers) and memory across trials.

Both run real studies through :func:`agelab.study.run_study` — what ``agelab run STUDY
--workers N`` does — each in a fresh process (``python -m agelab.bench.studies run CONFIG
OUT WORKERS``) on a fresh store, timed from process start to exit as a user sees it. The data
is cached and the MLflow tables exist before the clock starts, so every run pays the same:
interpreter start and imports, planning, the parent run, worker start-up (``--workers 2``
starts two processes with one torch thread each) and the trials.

Throughput: trials/hour over that wall time, and the steady-state rate from the first trial's
start to the last trial's end (Optuna's timestamps: start-up excluded).

Memory: in a one-worker run the trials run in that process; after each one it reads the peak
resident set size (``VmHWM`` in ``/proc/self/status``), the current one (``VmRSS``) and, on
CUDA, ``torch.cuda.max_memory_allocated``. Growth is measured after the first trial, which
pays the one-off costs (imports, allocator pools, kernels). The process wraps
``Worker.run_trial`` to take the readings; nothing else changes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agelab.bench.common import bench_config, describe_config, log_tail, proc_status_kb, say

__all__ = ["bench_memory", "bench_study_throughput", "memory_summary", "run_study_process"]


def run_study_process(cfg, workers: int, tmp: Path, log: Path) -> dict[str, Any]:
    """Run ``cfg`` (a study on its own store) with ``workers`` workers in a fresh process.

    Returns wall seconds, trials/hour, the steady-state rate and, for one worker, one memory
    row per trial (``per_trial``)."""
    from agelab.data.load import load_dataset
    from agelab.study import open_storage, open_study, storage_url
    from agelab.tracking import Tracker

    load_dataset(cfg.data, progress=False)  # cached before the clock starts
    Tracker(cfg.tracking, cfg.name)  # the store and its experiment exist already
    tmp.mkdir(parents=True, exist_ok=True)
    cfg_path = tmp / f"{cfg.name}-{workers}.json"
    out_path = tmp / f"{cfg.name}-{workers}.out.json"
    cfg_path.write_text(cfg.model_dump_json())
    cmd = [sys.executable, "-m", "agelab.bench.studies", "run", str(cfg_path), str(out_path)]
    t0 = time.perf_counter()
    with log.open("ab") as fh:
        rc = subprocess.call([*cmd, str(workers)], stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    study = open_study(cfg, open_storage(storage_url(cfg)))
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    done, planned = len(trials), cfg.search.n_total()
    if rc != 0 or done != planned or not out_path.is_file():
        raise RuntimeError(
            f"study {cfg.name!r} with {workers} worker(s) exited with {rc}, {done} of "
            f"{planned} trials complete; log {log}:\n{log_tail(log)}"
        )
    span = (
        max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    ).total_seconds()
    return {
        "workers": workers,
        "trials": done,
        "seconds": wall,
        "trials_per_hour": done / wall * 3600,
        "trial_span_seconds": span,
        "steady_trials_per_hour": done / max(span, 1e-9) * 3600,
        "mean_trial_seconds": sum(
            (t.datetime_complete - t.datetime_start).total_seconds() for t in trials
        )
        / done,
        "torch_threads_per_worker": cfg.train.threads or max(1, (os.cpu_count() or 1) // workers),
        "per_trial": json.loads(out_path.read_text()),
    }


def _grid_for(n_trials: int, tmp: Path, name: str, cache_dir: Path, shrink: dict[str, Any]):
    """The study config, with enough replicate seeds of its grid for ``n_trials`` trials
    (unless ``shrink`` names the seeds)."""
    cfg = bench_config(tmp / name, name, cache_dir=cache_dir, **shrink)
    if n_trials and "seeds" not in shrink:
        cells = cfg.search.grid_size() // len(cfg.search.seeds)
        seeds = list(range(math.ceil(n_trials / cells)))
        cfg = bench_config(tmp / name, name, cache_dir=cache_dir, **shrink | {"seeds": seeds})
    return cfg


def bench_study_throughput(
    tmp: Path,
    *,
    cache_dir: Path,
    workers: tuple[int, ...] = (1, 2),
    n_trials: int | None = None,
    log: Path | None = None,
    verbose: bool = True,
    **shrink: Any,
) -> dict[str, Any]:
    """Trials/hour of the demo grid (``shrink``: :func:`bench_config` keywords;
    ``n_trials``: enough replicate seeds for at least that many) per worker count, and
    ``scaling`` = trials/hour with the most workers / with one (``steady_scaling``: the same
    for the steady-state rates)."""
    log = log or tmp / "throughput.log"
    rows = []
    cfg = None
    for w in workers:
        cfg = _grid_for(n_trials or 0, tmp, f"bench-throughput-{w}", cache_dir, shrink)
        row = run_study_process(cfg, w, tmp, log)
        rows.append(row)
        if verbose:
            say(
                f"study throughput: {w} worker(s): {row['trials']} trials in "
                f"{row['seconds']:.1f} s = {row['trials_per_hour']:.0f} trials/h "
                f"({row['steady_trials_per_hour']:.0f} from the first trial's start to the "
                "last one's end)"
            )
    result: dict[str, Any] = {"config": describe_config(cfg), "runs": rows}
    if len(rows) > 1:
        result["scaling"] = rows[-1]["trials_per_hour"] / rows[0]["trials_per_hour"]
        result["steady_scaling"] = (
            rows[-1]["steady_trials_per_hour"] / rows[0]["steady_trials_per_hour"]
        )
    return result


def memory_summary(rows: list[dict[str, Any]], config: str) -> dict[str, Any]:
    """Growth of the peak RSS (and CUDA max allocated) after the first trial."""
    failed = [r for r in rows if r["state"] != "COMPLETE"]
    if len(rows) < 2 or failed:
        raise RuntimeError(f"memory: {len(rows)} trials ran, {len(failed)} not complete")
    first, mid, last = rows[0], rows[len(rows) // 2 - 1], rows[-1]
    if not first["peak_rss_mb"]:
        raise RuntimeError("memory: no /proc/self/status here (Linux only)")
    result: dict[str, Any] = {
        "config": config,
        "trials": len(rows),
        "peak_rss_mb_first": first["peak_rss_mb"],
        "peak_rss_mb_last": last["peak_rss_mb"],
        "growth": (last["peak_rss_mb"] - first["peak_rss_mb"]) / first["peak_rss_mb"],
        "rss_mb_first": first["rss_mb"],
        "rss_mb_last": last["rss_mb"],
        "rss_growth": (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"],
        # A leak keeps growing; a warm-up (allocator pools, caches) levels off: the growth
        # over the second half of the trials, and the last trial that raised the peak.
        "half_trial": mid["trial"],
        "growth_second_half": (last["peak_rss_mb"] - mid["peak_rss_mb"]) / mid["peak_rss_mb"],
        "last_peak_increase_trial": max(
            (
                b["trial"]
                for a, b in itertools.pairwise(rows)
                if b["peak_rss_mb"] > a["peak_rss_mb"]
            ),
            default=1,
        ),
        "per_trial": rows,
    }
    if first.get("cuda_max_allocated_mb"):
        result["cuda_max_allocated_mb_first"] = first["cuda_max_allocated_mb"]
        result["cuda_max_allocated_mb_last"] = last["cuda_max_allocated_mb"]
        result["cuda_growth"] = (
            last["cuda_max_allocated_mb"] - first["cuda_max_allocated_mb"]
        ) / first["cuda_max_allocated_mb"]
    return result


def say_memory(m: dict[str, Any]) -> None:
    say(
        f"memory: peak RSS {m['peak_rss_mb_first']:.0f} MB after trial 1, "
        f"{m['peak_rss_mb_last']:.0f} MB after trial {m['trials']} "
        f"(growth {m['growth']:+.1%}, {m['growth_second_half']:+.1%} after trial "
        f"{m['half_trial']}; current RSS {m['rss_growth']:+.1%})"
    )


def bench_memory(
    tmp: Path,
    *,
    cache_dir: Path,
    n_trials: int = 20,
    log: Path | None = None,
    verbose: bool = True,
    **shrink: Any,
) -> dict[str, Any]:
    """Peak RSS after each of ``n_trials`` consecutive trials of one worker in a fresh
    process: ``growth`` = (after the last trial − after the first) / after the first.
    ``shrink``: :func:`bench_config` keywords; the grid gets enough replicate seeds for
    ``n_trials`` trials (all of them run)."""
    cfg = _grid_for(n_trials, tmp, "bench-memory", cache_dir, shrink)
    run = run_study_process(cfg, 1, tmp, log or tmp / "memory.log")
    result = memory_summary(run["per_trial"], describe_config(cfg))
    if verbose:
        say_memory(result)
    return result


def _run_main(cfg_path: str, out_path: str, workers: int) -> int:
    """Entry of the study process: ``run_study`` with a memory reading after each trial
    that runs in this process (all of them with one worker, none with more)."""
    import torch

    from agelab import study as S
    from agelab.config import StudyConfig

    cfg = StudyConfig.model_validate_json(Path(cfg_path).read_text())
    rows: list[dict[str, Any]] = []
    run_trial = S.Worker.run_trial

    def measured(self, trial):
        outcome = run_trial(self, trial)
        row = {
            "trial": len(rows) + 1,
            "state": outcome.state,
            "seconds": round(outcome.seconds, 3),
            "peak_rss_mb": round((proc_status_kb("VmHWM") or 0) / 1024, 1),
            "rss_mb": round((proc_status_kb("VmRSS") or 0) / 1024, 1),
        }
        if torch.cuda.is_available():
            row["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            row["cuda_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        rows.append(row)
        return outcome

    S.Worker.run_trial = measured
    try:
        summary = S.run_study(cfg, workers=workers, quiet=True)
    finally:
        S.Worker.run_trial = run_trial
        Path(out_path).write_text(json.dumps(rows, indent=1))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "run":
        sys.exit(_run_main(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    sys.exit("usage: python -m agelab.bench.studies run CONFIG.json OUT.json WORKERS")

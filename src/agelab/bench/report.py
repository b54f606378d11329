"""The benchmark table: one row per comparison, with its goal and whether it was met."""

from __future__ import annotations

from typing import Any

PASS, MISS, INFO = "pass", "MISS", "—"

COLUMNS = ("#", "benchmark", "agelab", "baseline", "ratio", "goal", "met")


def _ips(s: dict[str, Any]) -> str:
    """Images/s of repeated runs: median, and the best (the least disturbed) run."""
    return f"{s['median']:.1f} (best {s['max']:.1f})"


def _ratio(best: float, median: float, unit: str = "") -> str:
    return f"{best:.3g}{unit} (median {median:.3g}{unit})"


def _status(ok: bool) -> str:
    return PASS if ok else MISS


def _row(section, benchmark, agelab="", baseline="", ratio="", goal="", met=INFO) -> dict:
    return dict(zip(COLUMNS, (section, benchmark, agelab, baseline, ratio, goal, met), strict=True))


def rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """The table rows of a results dict written by :func:`agelab.bench.main`, in the order of
    its sections (1 training, 2 tracking, 3 data, 4 study throughput, 5 memory)."""
    cuda = results["machine"]["device"] == "cuda"
    out: list[dict[str, str]] = []
    for t in results.get("training", []):
        out += _training_rows(t, cuda)
    out += [_gpu_row(g) for g in results.get("gpu", [])]
    if results.get("streaming"):
        out.append(_streaming_row(results["streaming"], cuda))
    if results.get("tracking"):
        out += _tracking_rows(results["tracking"])
    if results.get("synthetic"):
        syn = results["synthetic"]
        what = f"synthetic faces, {syn['n']:,} at {syn['size']}px (img/s)"
        out.append(_row("3", what, f"{syn['images_per_second']:.0f}"))
    if results.get("cache"):
        out += _cache_rows(results["cache"])
    th = results.get("study_throughput")
    if th and len(th["runs"]) > 1:
        out.append(_throughput_row(th))
    if results.get("memory"):
        out += _memory_rows(results["memory"])
    return out


def _training_rows(t: dict[str, Any], cuda: bool) -> list[dict[str, str]]:
    what = f"{t['backbone']} {t['image_size']}px, batch {t['batch_size']}, {t['n_images']} img"
    out = [
        _row(
            "1",
            f"training img/s, {what}: `fit` vs bare loop",
            _ips(t["fit_images_per_second"]),
            _ips(t["bare_images_per_second"]),
            _ratio(t["ratio_best"], t["ratio"]),
            "≥ 0.90",
            _status(t["ratio_best"] >= 0.90),
        )
    ]
    if "naive_ratio" in t:
        nv = t["naive"]
        files = (
            "files at the training size"
            if nv["source_size"] == t["image_size"]
            else f"{nv['source_size']}px files"
        )
        out.append(
            _row(
                "1",
                f"training img/s, {what}: `fit` vs naive pipeline (PIL, {files}, DataLoader "
                f"{nv['workers']} workers, `.item()` + `mlflow.log_metric` per step)",
                _ips(t["fit_images_per_second"]),
                _ips(t["naive_images_per_second"]),
                _ratio(t["naive_ratio_best"], t["naive_ratio"], "×"),
                "report (GPU)" if cuda else "≥ 3× (CPU)",
                INFO if cuda else _status(t["naive_ratio_best"] >= 3.0),
            )
        )
    return out


def _gpu_row(g: dict[str, Any]) -> dict[str, str]:
    peak = g.get("max_memory_allocated_mb")
    return _row(
        "1",
        f"GPU {g['variant']}, {g['backbone']} {g['image_size']}px batch {g['batch_size']}: "
        "`fit` img/s vs a bare loop in the same setting (fixed batch on the device)"
        + (f"; peak memory {peak:.0f} MB" if peak is not None else ""),
        _ips(g["fit_images_per_second"]),
        _ips(g["bare_images_per_second"]),
        _ratio(g["fraction_of_bare_best"], g["fraction_of_bare"]),
        "report",
    )


def _streaming_row(st: dict[str, Any], cuda: bool) -> dict[str, str]:
    return _row(
        "1",
        f"training img/s, {st['backbone']} {st['image_size']}px, batch {st['batch_size']}, "
        f"{st['n_images']} img: `fit` streaming from {st['shards']} memory-mapped shards "
        f"(prefetch thread) vs resident ({st['paths'].get('resident', 'resident')})",
        _ips(st["streaming_images_per_second"]),
        _ips(st["resident_images_per_second"]),
        _ratio(st["ratio_best"], st["ratio"]),
        "report (GPU)" if cuda else "≥ 0.90",
        INFO if cuda else _status(st["ratio_best"] >= 0.90),
    )


def _tracking_rows(tr: dict[str, Any]) -> list[dict[str, str]]:
    a, c = tr["agelab"], tr["mlflow_callback"]
    fmt = (
        "{params} params, {metric_keys} metrics ({metric_values} values), {tags} tags, "
        "{artifacts} artifacts"
    )
    return [
        _row(
            "2",
            f"MLflow share of a trial's wall time (one trial: {tr['config']}): agelab vs "
            "optuna-integration `MLflowCallback`",
            f"{a['share']:.2%} ({a['mlflow_seconds']:.2f} s in {a['mlflow_calls']} calls "
            f"of {a['trial_seconds']:.1f} s)",
            f"{c['share']:.2%} ({c['mlflow_seconds']:.2f} s of {c['trial_seconds']:.1f} s)",
            "",
            "≤ 2 %",
            _status(a["share"] <= 0.02),
        ),
        _row(
            "2",
            "what that trial records in MLflow",
            fmt.format(**a["records"]),
            fmt.format(**c["records"]),
        ),
    ]


def _cache_rows(ca: dict[str, Any]) -> list[dict[str, str]]:
    n = ca["n"]
    goal_s = 1.0 * n / 10_000  # the goal is 1 s per 10,000 images, scaled to n
    return [
        _row("3", f"cache build, {n:,} images at {ca['size']}px (s)", f"{ca['build_s']:.2f}"),
        _row(
            "3",
            f"dataset load, {n:,} images at {ca['size']}px (s): from the cache vs decoding "
            "the same JPEG files (every epoch, without a cache)",
            f"{ca['dataset_reload_s']:.2f} (cache entry alone {ca['reload_s']:.2f})",
            f"{ca['decode_jpeg_s']:.2f}",
            f"{ca['decode_jpeg_s'] / max(ca['dataset_reload_s'], 1e-9):.0f}× faster",
            "< 1 s per 10,000" + ("" if n == 10_000 else f" (< {goal_s:.2g} s here)"),
            _status(ca["dataset_reload_s"] < goal_s),
        ),
    ]


def _throughput_row(th: dict[str, Any]) -> dict[str, str]:
    one, many = th["runs"][0], th["runs"][-1]
    return _row(
        "4",
        f"study throughput, trials/hour ({th['config']}): {many['workers']} workers vs "
        f"{one['workers']}; whole `run_study` call (trials only, without start-up)",
        f"{many['trials_per_hour']:.0f} in {many['seconds']:.1f} s "
        f"({many['steady_trials_per_hour']:.0f})",
        f"{one['trials_per_hour']:.0f} in {one['seconds']:.1f} s "
        f"({one['steady_trials_per_hour']:.0f})",
        f"{th['scaling']:.2f}× ({th['steady_scaling']:.2f}×) scaling",
        "report",
    )


def _memory_rows(me: dict[str, Any]) -> list[dict[str, str]]:
    out = [
        _row(
            "5",
            f"peak RSS over {me['trials']} consecutive trials in one worker (MB, after the "
            f"last vs after the first; {me['config']})",
            f"{me['peak_rss_mb_last']:.0f}",
            f"{me['peak_rss_mb_first']:.0f}",
            f"{me['growth']:+.1%} growth ({me['growth_second_half']:+.1%} after trial "
            f"{me['half_trial']}; peak last rose at trial {me['last_peak_increase_trial']})",
            "≤ 5 %",
            _status(me["growth"] <= 0.05),
        )
    ]
    if "cuda_growth" in me:
        out.append(
            _row(
                "5",
                "CUDA max allocated over the same trials (MB, last vs first)",
                f"{me['cuda_max_allocated_mb_last']:.0f}",
                f"{me['cuda_max_allocated_mb_first']:.0f}",
                f"{me['cuda_growth']:+.1%} growth",
                "≤ 5 %",
                _status(me["cuda_growth"] <= 0.05),
            )
        )
    return out


def header(results: dict[str, Any]) -> str:
    m = results["machine"]
    device = m["gpu"] or "CPU only (no GPU)"
    load = results.get("load_average", {})
    load_txt = ""
    if load.get("start") and load.get("end"):
        load_txt = (
            f"; load average (1/5/15 min) {'/'.join(map(str, load['start']))} at the start, "
            f"{'/'.join(map(str, load['end']))} at the end"
        )
    others = results.get("others_load_cores")
    if others is not None:
        load_txt += f"; other processes kept {others:.1f} of {m['cpu_count']} cores busy on average"
    parts = results.get("section_seconds") or {}
    sections = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in parts.items())
    return (
        f"Measured {results['date']} by `{results['command']}` in {results['seconds'] / 60:.1f} "
        f"min ({sections}) "
        f"on {m['cpu']} ({m['cpu_count']} cores, {m['memory_gib']} GiB), device "
        f"{device}, {m['torch_threads']} torch threads, torch {m['torch']}{load_txt}. "
        f"Reproduce: `make {'bench-quick' if results['quick'] else 'bench'}`."
    )


def markdown(results: dict[str, Any]) -> str:
    lines = [header(results), ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in results["table"]:
        lines.append("| " + " | ".join(row[c].replace("|", "\\|") for c in COLUMNS) + " |")
    notes = results.get("notes") or []
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    return "\n".join(lines) + "\n"

"""``agelab data inspect SOURCE PATH``: what is in a real dataset, before training on it.

:func:`inspect_source` reads the manifest under ``on_bad=skip``, fully decodes every image
once (so truncated or fake images show up as bad rows; nothing is resized or cached) and
returns counts, an age histogram by decade, the distribution of original image sizes and
modes, the byte-identical duplicates (kept in one split when training) and the bad-row
summary. :func:`format_inspection` renders that as text.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from agelab.data.images import ImageProblem, decode_workers, open_image
from agelab.data.sources import (
    SOURCES,
    BadRow,
    Manifest,
    content_groups,
    duplicate_summary,
    format_bad_summary,
    format_duplicates,
    summarize_bad,
)
from agelab.errors import DataError


def _probe(file: str) -> tuple[tuple[int, int], str, str] | ImageProblem:
    try:
        img = open_image(file)
    except ImageProblem as exc:
        return exc
    return img.size, img.mode, img.format or "?"


def inspect_source(
    source: str, path: str | Path, *, max_age: float = 120.0, progress: bool = True
) -> dict[str, Any]:
    """Scan a real source and describe it (see the module docstring)."""
    spec = SOURCES.get(source)
    if spec is None:
        raise DataError(f"unknown data source {source!r}; valid: {', '.join(SOURCES)}")
    if spec.read is None:
        raise DataError(
            f"{source!r} is generated, not read from files: nothing to inspect "
            "(use `agelab data preview` to look at synthetic faces)"
        )
    manifest = spec.read(Path(path), max_age=max_age, on_bad="skip")
    probes = _probe_all(list(manifest.table["file"]), progress)
    bad = list(manifest.bad.rows)
    ok, counts = _tally(probes, manifest, bad)
    good = manifest.table[ok]
    ages = good["age"].to_numpy(dtype=np.float64)
    groups = content_groups(good["file"].tolist(), good["size"].tolist())
    return {
        "source": source,
        "path": str(manifest.origin),
        "n_rows": manifest.n_rows,
        "n_ok": int(ok.sum()),
        "n_bad": len(bad),
        "n_subjects": len({s for s in good["subject"] if s}),
        "has_boxes": manifest.has_boxes,
        "ages": _age_summary(ages),
        "age_histogram": _decade_histogram(ages),
        **{name: dict(counter.most_common()) for name, counter in counts.items()},
        "bad_rows": summarize_bad(bad),
        "duplicates": duplicate_summary(groups, good["path"].tolist(), good["age"].tolist()),
        "notes": list(manifest.notes),
    }


def _probe_all(files: list[str], progress: bool) -> list:
    """:func:`_probe` every file on the decoding thread pool, in input order."""
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        return list(
            tqdm(
                pool.map(_probe, files, chunksize=16),
                total=len(files),
                desc="reading images",
                unit="img",
                disable=not progress,
                leave=False,
            )
        )


def _tally(
    probes: list, manifest: Manifest, bad: list[BadRow]
) -> tuple[np.ndarray, dict[str, Counter[str]]]:
    """Which images opened (appending a bad row for each that did not), and the counts of
    their sizes, modes and formats."""
    ok = np.zeros(len(probes), dtype=bool)
    counts: dict[str, Counter[str]] = {
        "image_sizes": Counter(),
        "modes": Counter(),
        "formats": Counter(),
    }
    for i, probe in enumerate(probes):
        if isinstance(probe, ImageProblem):
            bad.append(BadRow(probe.reason, manifest.table["where"].iloc[i], probe.detail))
            continue
        ok[i] = True
        (w, h), mode, fmt = probe
        counts["image_sizes"][f"{w}x{h}"] += 1
        counts["modes"][mode] += 1
        counts["formats"][fmt] += 1
    return ok, counts


def _age_summary(ages: np.ndarray) -> dict[str, float]:
    if not len(ages):
        return {}
    return {
        "min": float(ages.min()),
        "max": float(ages.max()),
        "mean": round(float(ages.mean()), 2),
        "median": float(np.median(ages)),
    }


def _decade_histogram(ages: np.ndarray) -> dict[str, int]:
    histogram: dict[str, int] = {}
    if len(ages):
        for decade in range(math.floor(ages.max() / 10) + 1):
            lo = decade * 10
            histogram[f"{lo}-{lo + 9}"] = int(((ages >= lo) & (ages < lo + 10)).sum())
    return histogram


def format_inspection(report: dict[str, Any], *, bar_width: int = 40, top_sizes: int = 8) -> str:
    """Render :func:`inspect_source`'s dict as text (histogram bars, size table, bad rows)."""
    lines = [
        f"{report['source']} dataset at {report['path']}",
        f"  rows/files: {report['n_rows']}   usable: {report['n_ok']}   bad: {report['n_bad']}"
        + (
            f"   subjects: {report['n_subjects']}"
            if report.get("n_subjects")
            else "   subjects: none (each image is its own split group)"
        ),
    ]
    if report.get("has_boxes"):
        lines.append("  face boxes: yes (x, y, w, h columns)")
    ages = report.get("ages") or {}
    if ages:
        lines.append(
            f"  ages: {ages['min']:g}–{ages['max']:g}, mean {ages['mean']:g}, "
            f"median {ages['median']:g}"
        )
        hist = report.get("age_histogram", {})
        peak = max(hist.values(), default=0) or 1
        lines.append("  age histogram (by decade):")
        for band, count in hist.items():
            bar = "█" * round(bar_width * count / peak)
            lines.append(f"    {band:>7}  {count:6d}  {bar}")
    sizes = report.get("image_sizes", {})
    if sizes:
        lines.append(f"  original image sizes (W×H), {len(sizes)} distinct:")
        shown = list(sizes.items())[:top_sizes]
        for wh, count in shown:
            lines.append(f"    {wh:>11}  {count:6d}")
        rest = sum(sizes.values()) - sum(c for _, c in shown)
        if rest:
            lines.append(f"    {'other':>11}  {rest:6d}")
    if report.get("modes"):
        lines.append(
            "  modes: "
            + ", ".join(f"{m} {c}" for m, c in report["modes"].items())
            + "   (all converted to RGB)"
        )
    if report.get("formats"):
        lines.append("  formats: " + ", ".join(f"{f} {c}" for f, c in report["formats"].items()))
    duplicates = report.get("duplicates") or {}
    lines.append(
        f"  {format_duplicates(duplicates)}"
        if duplicates.get("n_groups")
        else "  duplicate images: none (no two files are byte-identical)"
    )
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    bad = format_bad_summary(report.get("bad_rows", {}), verb="found")
    if bad:
        lines.append("  " + bad.replace("\n", "\n  "))
    else:
        lines.append("  no bad rows")
    return "\n".join(lines)

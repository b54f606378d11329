"""Data: sources, validation, decoding, cache and splits → one :class:`FaceDataset`.

Public API::

    SOURCES                  name → Source (synthetic, utkface, fgnet, csv)
    load_dataset(cfg)        DataConfig → FaceDataset (decoded once, cached, split)
    FaceDataset              the in-memory dataset every trial trains on
    DataError                a data problem the user can fix (message says where and what)

``load_dataset`` for a real source: read the manifest (:mod:`.sources`) → fingerprint the
files and labels → load the decoded images from the cache or decode them
(:mod:`.images`, thread pool) and cache them (:mod:`.cache`) → split (:mod:`.split`).
For ``synthetic``: generate (:mod:`.synth`) or load from the cache → split.

Importing this package is light (no torch): ``FaceDataset`` is loaded on first access, so the
config validator can ask for ``SOURCES`` cheaply.
"""

from __future__ import annotations

import hashlib
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agelab.data.sources import (
    REASONS,
    SOURCES,
    BadRow,
    DataError,
    Manifest,
    Source,
    format_bad_summary,
    read_manifest,
    summarize_bad,
)

if TYPE_CHECKING:
    from agelab.config import DataConfig
    from agelab.data.dataset import FaceDataset

__all__ = [
    "REASONS",
    "SOURCES",
    "DataError",
    "FaceDataset",
    "Manifest",
    "Source",
    "load_dataset",
    "read_manifest",
]


def __getattr__(name: str) -> Any:
    if name == "FaceDataset":
        from agelab.data.dataset import FaceDataset

        return FaceDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_dataset(cfg: DataConfig, *, progress: bool = True) -> FaceDataset:
    """Build the dataset for ``cfg`` (see the module docstring). Raises :class:`DataError`."""
    if cfg.source not in SOURCES:
        raise DataError(f"unknown data source {cfg.source!r}; valid: {', '.join(SOURCES)}")
    t0 = time.perf_counter()
    if SOURCES[cfg.source].read is None:
        data = _load_synthetic(cfg, progress)
    else:
        data = _load_real(cfg, progress)
    data.info["seconds"] = round(time.perf_counter() - t0, 3)
    return data


# ---------------------------------------------------------------------------- helpers


def _age_stats(ages: np.ndarray) -> dict[str, float]:
    return {
        "age_min": float(ages.min()),
        "age_max": float(ages.max()),
        "age_mean": round(float(ages.mean()), 3),
    }


def _try_save(cache_dir: Path, key: str, fp: str, arrays: dict, meta: dict) -> Path | None:
    """Save a cache entry; a cache that cannot be written only costs speed, so warn."""
    from agelab.data.cache import CacheWarning, save_entry

    try:
        return save_entry(cache_dir, key, fp, arrays, meta)
    except OSError as exc:
        warnings.warn(
            f"agelab: could not write the data cache in {cache_dir}: {exc}",
            CacheWarning,
            stacklevel=3,
        )
        return None


def _finish(
    cfg: DataConfig,
    *,
    images: np.ndarray,
    ages: np.ndarray,
    subjects: np.ndarray,
    fp: str,
    info: dict[str, Any],
    true_ages: np.ndarray | None = None,
    paths: np.ndarray | None = None,
) -> FaceDataset:
    import torch

    from agelab.data.dataset import FaceDataset
    from agelab.data.split import assign_splits, split_summary

    split = assign_splits(ages, subjects, cfg.split)
    info.update(_age_stats(ages))
    info["n_images"] = len(ages)
    info["n_subjects"] = len({s for s in subjects if s})
    info["image_size"] = cfg.image_size
    info["split"] = split_summary(split, ages, subjects)
    info["split_seed"] = cfg.split.seed
    return FaceDataset(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        ages=ages.astype(np.float32),
        subjects=subjects,
        split=split,
        fingerprint=fp,
        source=cfg.source,
        true_ages=true_ages,
        paths=paths,
        info=info,
    )


# -------------------------------------------------------------------------- synthetic


def _synth_version(synth: Any) -> str:
    """The generator's VERSION constant, or a hash of its source when it has none."""
    version = getattr(synth, "VERSION", None)
    if version is not None:
        return str(version)
    return "src-" + hashlib.sha256(Path(synth.__file__).read_bytes()).hexdigest()[:16]


def _load_synthetic(cfg: DataConfig, progress: bool) -> FaceDataset:
    from agelab.data import synth
    from agelab.data.cache import entry_key, fingerprint, load_entry

    payload = {
        "source": "synthetic",
        "synthetic": cfg.synthetic.model_dump(mode="json"),
        "image_size": cfg.image_size,
        "generator_version": _synth_version(synth),
    }
    fp = fingerprint(payload)
    key = entry_key("synthetic", fp)
    cache_dir = cfg.resolved_cache_dir()
    entry = load_entry(cache_dir, key, fp)
    if entry is not None:
        arrays, meta, side = entry.arrays, entry.meta, entry.path
    else:
        faces = synth.generate(cfg.synthetic, cfg.image_size, progress=progress)
        arrays = {
            "images": np.ascontiguousarray(faces.images, dtype=np.uint8),
            "ages": np.asarray(faces.ages, dtype=np.float32),
            "true_ages": np.asarray(faces.true_ages, dtype=np.float32),
            "subjects": np.asarray(faces.subjects, dtype=np.int64),
        }
        meta = {"noise_floor_mae": float(faces.noise_floor_mae)}
        side = _try_save(cache_dir, key, fp, arrays, meta)
    info: dict[str, Any] = {
        "source": "synthetic",
        "n_bad": 0,
        "bad_rows": summarize_bad([]),
        "noise_floor_mae": float(meta.get("noise_floor_mae", 0.0)),
        "generator_version": payload["generator_version"],
        "cache_hit": entry is not None,
        "cache_file": str(side) if side else None,
    }
    return _finish(
        cfg,
        images=arrays["images"],
        ages=arrays["ages"].astype(np.float32),
        subjects=arrays["subjects"].astype(str),
        true_ages=arrays["true_ages"].astype(np.float32),
        fp=fp,
        info=info,
    )


# ------------------------------------------------------------------------------- real


def _boxes(manifest: Manifest) -> list:
    from agelab.data.images import Box

    if not manifest.has_boxes:
        return [None] * len(manifest)
    t = manifest.table
    return [
        None if np.isnan(x) else Box(float(x), float(y), float(w), float(h))
        for x, y, w, h in zip(t["x"], t["y"], t["w"], t["h"], strict=True)
    ]


def _real_fingerprint(cfg: DataConfig, manifest: Manifest) -> str:
    from agelab.data.cache import fingerprint
    from agelab.data.images import DECODER_VERSION

    t = manifest.table
    box_cols = ["x", "y", "w", "h"] if manifest.has_boxes else []
    rows = t[["path", "size", "mtime_ns", "age", "subject", *box_cols]].astype(object)
    return fingerprint(
        {
            "source": cfg.source,
            "decoder": DECODER_VERSION,
            "image_size": cfg.image_size,
            "center_crop": cfg.center_crop,
            # NaN (no box) is not JSON: repr() keeps every value exact and comparable.
            "rows": [[repr(v) for v in row] for row in rows.itertuples(index=False)],
        }
    )


def _top(counter: Counter, k: int = 8) -> dict[str, int]:
    return dict(counter.most_common(k))


def _decode_manifest(cfg: DataConfig, manifest: Manifest, progress: bool) -> tuple[dict, dict]:
    """Decode every manifest row; returns (arrays, meta) ready for the cache."""
    from agelab.data.images import ImageProblem, decode_many

    t = manifest.table
    t0 = time.perf_counter()
    try:
        result = decode_many(
            list(t["file"]),
            cfg.image_size,
            cfg.center_crop,
            _boxes(manifest),
            stop_at_first=cfg.on_bad == "error",
            progress=progress,
            desc=f"decoding {cfg.source} images",
        )
    except ImageProblem as exc:
        where = t["where"].iloc[exc.index]  # type: ignore[attr-defined]
        bad = BadRow(exc.reason, where, exc.detail)
        raise DataError(bad.message(), reason=exc.reason, where=where) from None
    sizes = Counter(f"{s[0]}x{s[1]}" for s in result.sizes if s is not None)
    modes = Counter(m for m in result.modes if m is not None)
    bad = [
        {"index": int(i), "reason": p.reason, "where": t["where"].iloc[i], "detail": p.detail}
        for i, p in sorted(result.problems.items())
    ]
    meta = {
        "decode_bad": bad,
        "original_sizes": _top(sizes),
        "original_modes": _top(modes),
        "decode_seconds": round(time.perf_counter() - t0, 3),
    }
    return {"images": result.images, "ok": result.ok}, meta


def _load_real(cfg: DataConfig, progress: bool) -> FaceDataset:
    from agelab.data.cache import entry_key, load_entry

    assert cfg.path is not None  # guaranteed by DataConfig validation
    manifest = read_manifest(cfg.source, cfg.path, max_age=cfg.max_age, on_bad=cfg.on_bad)
    fp = _real_fingerprint(cfg, manifest)
    key = entry_key(cfg.source, fp)
    cache_dir = cfg.resolved_cache_dir()
    entry = load_entry(cache_dir, key, fp)
    if entry is not None and len(entry.arrays.get("ok", ())) != len(manifest):
        entry = None  # cannot happen with a matching fingerprint; be safe anyway
    if entry is not None:
        arrays, meta, side = entry.arrays, entry.meta, entry.path
        decode_bad = meta.get("decode_bad", [])
        if decode_bad and cfg.on_bad == "error":
            # Built earlier under on_bad=skip: the same files are still bad.
            first = BadRow(decode_bad[0]["reason"], decode_bad[0]["where"], decode_bad[0]["detail"])
            raise DataError(first.message(), reason=first.reason, where=first.where)
    else:
        arrays, meta = _decode_manifest(cfg, manifest, progress)
        side = _try_save(cache_dir, key, fp, arrays, meta)

    ok = np.asarray(arrays["ok"], dtype=bool)
    bad_rows = list(manifest.bad.rows) + [
        BadRow(b["reason"], b["where"], b["detail"]) for b in meta.get("decode_bad", [])
    ]
    summary = summarize_bad(bad_rows)
    if not ok.any():
        raise DataError(
            f"no usable images in {manifest.origin}: all {manifest.n_rows} row(s) are bad\n"
            + format_bad_summary(summary, manifest.origin)
        )
    if bad_rows:
        print(f"agelab: {format_bad_summary(summary, manifest.origin)}", file=sys.stderr)

    t = manifest.table[ok]
    info: dict[str, Any] = {
        "source": cfg.source,
        "path": str(manifest.origin),
        "root": str(manifest.root),
        "n_rows": manifest.n_rows,
        "n_bad": len(bad_rows),
        "bad_rows": summary,
        "has_boxes": manifest.has_boxes,
        "center_crop": cfg.center_crop,
        "original_sizes": meta.get("original_sizes", {}),
        "original_modes": meta.get("original_modes", {}),
        "decode_seconds": meta.get("decode_seconds"),
        "cache_hit": entry is not None,
        "cache_file": str(side) if side else None,
        "notes": manifest.notes,
    }
    return _finish(
        cfg,
        images=arrays["images"],
        ages=t["age"].to_numpy(dtype=np.float32),
        subjects=np.asarray(t["subject"].tolist(), dtype=str),
        paths=np.asarray(t["path"].tolist(), dtype=str),
        fp=fp,
        info=info,
    )

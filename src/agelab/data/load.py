"""``load_dataset``: a ``DataConfig`` → the :class:`FaceDataset` every trial trains on.

For a real source: read the manifest (:mod:`.sources`) → fingerprint the files and labels →
load the decoded images from the cache or decode them (:mod:`.images`, thread pool) and cache
them (:mod:`.cache`) → find byte-identical files (:func:`.sources.content_groups`) → split
(:mod:`.split`), each set of duplicates in one split. For ``synthetic``: load from the cache
or generate (:mod:`.synth`) and cache → split.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agelab.data import synth
from agelab.data.cache import (
    CacheEntry,
    CacheWarning,
    entry_key,
    fingerprint,
    load_entry,
    save_entry,
)
from agelab.data.dataset import FaceDataset
from agelab.data.images import DECODER_VERSION, Box, ImageProblem, decode_many
from agelab.data.shards import (
    Budget,
    ShardedImages,
    ShardStore,
    ShardWriter,
    build_in_chunks,
    decoded_bytes,
    human_bytes,
    join_images,
    open_store,
    resident_budget,
)
from agelab.data.sources import (
    SOURCES,
    BadRow,
    Manifest,
    content_groups,
    duplicate_summary,
    format_bad_summary,
    format_duplicates,
    read_manifest,
    summarize_bad,
)
from agelab.data.split import assign_splits, protocol_checks, split_summary
from agelab.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from agelab.config import DataConfig

__all__ = ["load_dataset"]


def load_dataset(cfg: DataConfig, *, progress: bool = True) -> FaceDataset:
    """Build the dataset for ``cfg`` (see the module docstring). Raises :class:`DataError`."""
    if cfg.source not in SOURCES:
        raise DataError(f"unknown data source {cfg.source!r}; valid: {', '.join(SOURCES)}")
    t0 = time.perf_counter()
    budget = resident_budget(cfg.max_resident_gb)  # beyond it, images stream from disk
    if SOURCES[cfg.source].read is None:
        data = _load_synthetic(cfg, progress, budget)
    else:
        data = _load_real(cfg, progress, budget)
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
    images: np.ndarray | ShardedImages,
    ages: np.ndarray,
    subjects: np.ndarray,
    fp: str,
    info: dict[str, Any],
    true_ages: np.ndarray | None = None,
    paths: np.ndarray | None = None,
    duplicates: np.ndarray | None = None,
    given: np.ndarray | None = None,
) -> FaceDataset:
    """Split the arrays and wrap them, with the split and label summaries added to ``info``."""
    split = assign_splits(ages, subjects, cfg.split, duplicates, given)
    if given is not None:
        info["protocol"] = _protocol_summary(split, subjects, duplicates)
    info.update(_age_stats(ages))
    info["n_images"] = len(ages)
    info.setdefault("duplicates", duplicate_summary(np.full(len(ages), -1), [], []))
    info["n_subjects"] = len({s for s in subjects if s})
    info["image_size"] = cfg.image_size
    info["split"] = split_summary(split, ages, subjects)
    info["split_seed"] = cfg.split.seed
    if not isinstance(images, ShardedImages):
        images = torch.from_numpy(np.ascontiguousarray(images))
    return FaceDataset(
        images=images,
        ages=ages.astype(np.float32),
        subjects=subjects,
        split=split,
        fingerprint=fp,
        source=cfg.source,
        true_ages=true_ages,
        paths=paths,
        info=info,
    )


def _protocol_summary(
    split: np.ndarray, subjects: np.ndarray, duplicates: np.ndarray | None
) -> dict[str, Any]:
    """A given protocol's checks (see :func:`.split.protocol_checks`), said on stderr when
    something sits in more than one split."""
    dup = duplicates if duplicates is not None else np.full(len(split), -1)
    checks = protocol_checks(split, subjects, dup)
    problems = [f"{n} {what.replace('_', ' ')}" for what, n in checks.items() if n]
    if problems:
        print(
            f"agelab: the given splits put {'; '.join(problems)} (a face of a test person, or "
            "a copy of a test image, is trained on: the test MAE is optimistic)",
            file=sys.stderr,
        )
    return checks


def _residency(what: str, n: int, cfg: DataConfig, budget: Budget) -> dict[str, Any]:
    """Whether ``n`` decoded images of ``what`` stay in RAM (counted against ``budget``) or
    stream from the shard cache: ``info["residency"]``, completed by :func:`_say_streaming`."""
    n_bytes = decoded_bytes(n, cfg.image_size)
    left = budget.bytes
    resident = budget.take(n_bytes)
    limit = (
        budget.rule if left == budget.total else f"the {human_bytes(left)} left of {budget.rule}"
    )
    return {
        "path": "resident" if resident else "streaming",
        "what": what,
        "decoded_bytes": n_bytes,
        "limit": limit,
    }


def _say_streaming(residency: dict[str, Any], store: ShardStore) -> None:
    """The streaming line on stderr, and where the shards are in ``residency``."""
    folder = store.images.where
    residency |= {"shards": folder, "n_shards": len(store.images.shards)}
    print(
        f"agelab: {residency['what']} {human_bytes(residency['decoded_bytes'])} decoded > "
        f"{residency['limit']}: streaming from {folder} ({len(store.images.shards)} shards)",
        file=sys.stderr,
    )


# -------------------------------------------------------------------------- synthetic


def _generate_arrays(cfg: DataConfig, progress: bool, faces: Any = None) -> tuple[dict, dict]:
    """Generate the synthetic faces; returns (arrays, meta) ready for the cache. ``faces``:
    already generated into a shard store (its labels only, then)."""
    streamed = faces is not None  # its images went to a shard store
    if faces is None:
        faces = synth.generate(cfg.synthetic, cfg.image_size, progress=progress)
    arrays = {
        "ages": np.asarray(faces.ages, dtype=np.float32),
        "true_ages": np.asarray(faces.true_ages, dtype=np.float32),
        "subjects": np.asarray(faces.subjects, dtype=np.int64),
    }
    if not streamed:
        arrays = {"images": np.ascontiguousarray(faces.images, dtype=np.uint8), **arrays}
    return arrays, {"noise_floor_mae": float(faces.noise_floor_mae)}


def _synthetic_shards(cfg: DataConfig, key: str, fp: str, progress: bool) -> ShardStore:
    """Generate straight into a new shard store: the pixels never all sit in RAM."""
    writer = ShardWriter(cfg.resolved_cache_dir(), key, fp, cfg.synthetic.n_images, cfg.image_size)
    writer.check_space()
    target = writer.open_all()
    try:
        faces = synth.generate(cfg.synthetic, cfg.image_size, progress=progress, out=target)
        stamps = writer.commit_all(target)
    except BaseException:
        target.discard()
        raise
    arrays, meta = _generate_arrays(cfg, progress, faces)
    return writer.finish(stamps, arrays, meta)


def _load_synthetic(cfg: DataConfig, progress: bool, budget: Budget) -> FaceDataset:
    payload = {
        "source": "synthetic",
        "synthetic": cfg.synthetic.model_dump(mode="json"),
        "image_size": cfg.image_size,
        "generator_version": synth.VERSION,
    }
    fp = fingerprint(payload)
    key = entry_key("synthetic", fp)
    cache_dir = cfg.resolved_cache_dir()
    residency = _residency("dataset", cfg.synthetic.n_images, cfg, budget)
    entry: CacheEntry | ShardStore | None
    if residency["path"] == "streaming":
        entry = open_store(cache_dir, key, fp)
        store = entry or _synthetic_shards(cfg, key, fp, progress)
        assert store is not None
        arrays, meta, side = {**store.arrays, "images": store.images}, store.meta, store.path
        _say_streaming(residency, store)
    elif (entry := load_entry(cache_dir, key, fp)) is not None:
        arrays, meta, side = entry.arrays, entry.meta, entry.path
    else:
        arrays, meta = _generate_arrays(cfg, progress)
        side = _try_save(cache_dir, key, fp, arrays, meta)
    info: dict[str, Any] = {
        "source": "synthetic",
        "n_bad": 0,
        "bad_rows": summarize_bad([]),
        "noise_floor_mae": float(meta.get("noise_floor_mae", 0.0)),
        "generator_version": payload["generator_version"],
        "cache_hit": entry is not None,
        "cache_file": str(side) if side else None,
        "residency": residency,
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


def _boxes(manifest: Manifest) -> list[Box | None]:
    if not manifest.has_boxes:
        return [None] * len(manifest)
    t = manifest.table
    return [
        None if np.isnan(x) else Box(float(x), float(y), float(w), float(h))
        for x, y, w, h in zip(t["x"], t["y"], t["w"], t["h"], strict=True)
    ]


def _real_fingerprint(cfg: DataConfig, manifest: Manifest) -> str:
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


def _cached_real(cfg: DataConfig, manifest: Manifest, key: str, fp: str) -> CacheEntry | None:
    """The cache entry for these files, or None; raises for bad files under on_bad=error."""
    entry = load_entry(cfg.resolved_cache_dir(), key, fp)
    if entry is None or len(entry.arrays.get("ok", ())) != len(manifest):
        return None  # a length mismatch cannot happen with a matching fingerprint; be safe
    _refuse_known_bad(cfg, entry.meta)
    return entry


def _refuse_known_bad(cfg: DataConfig, meta: dict) -> None:
    """Under on_bad=error, the first bad file of a cache built earlier under on_bad=skip (the
    same files are still bad)."""
    decode_bad = meta.get("decode_bad", [])
    if decode_bad and cfg.on_bad == "error":
        first = BadRow(decode_bad[0]["reason"], decode_bad[0]["where"], decode_bad[0]["detail"])
        raise DataError(first.message(), reason=first.reason, where=first.where)


def _real_shards(
    cfg: DataConfig, manifest: Manifest, key: str, fp: str, progress: bool
) -> tuple[ShardStore, bool]:
    """The shard store of these files (and whether it was there): decoded one shard at a time
    (resuming after the last complete shard of an interrupted build), never all in RAM."""
    cache_dir = cfg.resolved_cache_dir()
    store = open_store(cache_dir, key, fp)
    hit = store is not None and len(store.arrays.get("ok", ())) == len(manifest)
    if not hit:
        writer = ShardWriter(cache_dir, key, fp, len(manifest), cfg.image_size)
        boxes, k = _boxes(manifest), len(writer.bounds)

        def decode(a: int, b: int) -> tuple[np.ndarray, dict]:
            desc = f"decoding {cfg.source} images, shard {a // writer.rows + 1}/{k}"
            return _decode_rows(cfg, manifest, boxes, a, b, progress, desc)

        stamps = build_in_chunks(writer, decode)
        ok, meta = _merge_facts(stamps, len(manifest))
        store = writer.finish(stamps, {"ok": ok}, meta)
    _refuse_known_bad(cfg, store.meta)
    return store, hit


def _decode_rows(
    cfg: DataConfig,
    manifest: Manifest,
    boxes: list[Box | None],
    a: int,
    b: int,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, dict]:
    """Rows ``a:b`` of the manifest decoded (a bad row left zero) and what decoding found."""
    t = manifest.table
    t0 = time.perf_counter()
    try:
        result = decode_many(list(t["file"].iloc[a:b]), cfg.image_size, cfg.center_crop,
                             boxes[a:b], stop_at_first=cfg.on_bad == "error",
                             progress=progress, desc=desc)  # fmt: skip
    except ImageProblem as exc:
        where = t["where"].iloc[a + exc.index]  # type: ignore[attr-defined]
        bad = BadRow(exc.reason, where, exc.detail)
        raise DataError(bad.message(), reason=exc.reason, where=where) from None
    images = np.zeros((b - a, 3, cfg.image_size, cfg.image_size), dtype=np.uint8)
    images[result.ok] = result.images
    bad = [
        {"index": a + i, "reason": p.reason, "where": t["where"].iloc[a + i], "detail": p.detail}
        for i, p in sorted(result.problems.items())
    ]
    facts = {
        "bad": bad,
        "sizes": dict(Counter(f"{s[0]}x{s[1]}" for s in result.sizes if s is not None)),
        "modes": dict(Counter(m for m in result.modes if m is not None)),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return images, facts


def _merge_facts(stamps: list[dict], n: int) -> tuple[np.ndarray, dict]:
    """Which rows decoded, and the cache meta of :func:`_decode_manifest`, from the shards."""
    ok = np.ones(n, dtype=bool)
    bad, sizes, modes, seconds = [], Counter(), Counter(), 0.0
    for stamp in stamps:
        facts = stamp.get("facts") or {}
        bad += facts.get("bad", [])
        sizes.update(facts.get("sizes", {}))
        modes.update(facts.get("modes", {}))
        seconds += facts.get("seconds", 0.0)
    ok[[int(b["index"]) for b in bad]] = False
    meta = {
        "decode_bad": bad,
        "original_sizes": _top(sizes),
        "original_modes": _top(modes),
        "decode_seconds": round(seconds, 3),
    }
    return ok, meta


def _bad_rows(manifest: Manifest, meta: dict, ok: np.ndarray) -> list[BadRow]:
    """Manifest and decoding problems together; raises when no image is usable, otherwise
    prints the summary (the rows were skipped under on_bad=skip)."""
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
    return bad_rows


def _real_info(
    cfg: DataConfig, manifest: Manifest, meta: dict, bad_rows: list[BadRow]
) -> dict[str, Any]:
    return {
        "source": cfg.source,
        "path": str(manifest.origin),
        "root": str(manifest.root),
        "n_rows": manifest.n_rows,
        "n_bad": len(bad_rows),
        "bad_rows": summarize_bad(bad_rows),
        "has_boxes": manifest.has_boxes,
        "center_crop": cfg.center_crop,
        "original_sizes": meta.get("original_sizes", {}),
        "original_modes": meta.get("original_modes", {}),
        "decode_seconds": meta.get("decode_seconds"),
    }


def _load_real(cfg: DataConfig, progress: bool, budget: Budget) -> FaceDataset:
    images, table, info, fp = _real_arrays(cfg, progress, budget)
    if cfg.test is not None:
        images, table, info, fp = _with_test_source(cfg, images, table, info, fp, progress, budget)
    given = _given_splits(cfg, table)
    duplicates = _duplicates(table, info)
    if given is not None:  # a fixed protocol: part of what the study's numbers mean
        fp = fingerprint({"data": fp, "given_splits": given.tolist()})
    return _finish(
        cfg,
        images=images,
        ages=table["age"].to_numpy(dtype=np.float32),
        subjects=np.asarray(table["subject"].tolist(), dtype=str),
        paths=np.asarray(table["path"].tolist(), dtype=str),
        fp=fp,
        info=info,
        duplicates=duplicates,
        given=given,
    )


def _real_arrays(
    cfg: DataConfig, progress: bool, budget: Budget, what: str = "dataset"
) -> tuple[np.ndarray | ShardedImages, pd.DataFrame, dict[str, Any], str]:
    """One real source: (decoded images, the usable rows, info, fingerprint), from the cache
    when it has them; the images stream from a shard store when they do not fit ``budget``."""
    assert cfg.path is not None  # guaranteed by DataConfig validation
    manifest = read_manifest(cfg.source, cfg.path, max_age=cfg.max_age, on_bad=cfg.on_bad)
    fp = _real_fingerprint(cfg, manifest)
    key = entry_key(cfg.source, fp)
    residency = _residency(what, len(manifest), cfg, budget)
    if residency["path"] == "streaming":
        store, hit = _real_shards(cfg, manifest, key, fp, progress)
        arrays, meta, side = store.arrays, store.meta, store.path
        _say_streaming(residency, store)
    elif (entry := _cached_real(cfg, manifest, key, fp)) is not None:
        arrays, meta, side, hit = entry.arrays, entry.meta, entry.path, True
    else:
        arrays, meta = _decode_manifest(cfg, manifest, progress)
        side, hit = _try_save(cfg.resolved_cache_dir(), key, fp, arrays, meta), False
    ok = np.asarray(arrays["ok"], dtype=bool)
    bad_rows = _bad_rows(manifest, meta, ok)
    info = _real_info(cfg, manifest, meta, bad_rows)
    info["cache_hit"] = hit
    info["cache_file"] = str(side) if side else None
    info["notes"] = manifest.notes
    info["residency"] = residency
    table = manifest.table[ok].reset_index(drop=True)
    table.attrs["origin"] = str(manifest.origin)
    if residency["path"] == "streaming":
        return store.images.select(np.flatnonzero(ok)), table, info, fp
    return np.asarray(arrays["images"]), table, info, fp


def _with_test_source(
    cfg: DataConfig,
    images: np.ndarray | ShardedImages,
    table: pd.DataFrame,
    info: dict[str, Any],
    fp: str,
    progress: bool,
    budget: Budget,
) -> tuple[np.ndarray | ShardedImages, pd.DataFrame, dict[str, Any], str]:
    """``data.test``: every image of a second source is the test split; the main source's
    rows keep only train, calib and conformal (any split they give is not used)."""
    import pandas as pd

    test = cfg.test
    assert test is not None and test.path is not None
    test_cfg = cfg.model_copy(
        update={"source": test.source, "path": test.path, "on_bad": test.on_bad or cfg.on_bad,
                "test": None}
    )  # fmt: skip
    t_images, t_table, t_info, t_fp = _real_arrays(test_cfg, progress, budget, "test source")
    table = table.assign(split="train", fold="")
    # Paths stay readable and unambiguous: the test rows say where they come from.
    t_table = t_table.assign(split="test", fold="", path="test:" + t_table["path"])
    info["test_source"] = {k: t_info[k] for k in ("source", "path", "n_rows", "n_bad", "residency")}
    merged = pd.concat([table, t_table], ignore_index=True)
    merged.attrs["origin"] = f"{table.attrs.get('origin')} + {t_table.attrs.get('origin')}"
    both = fingerprint({"main": fp, "test": t_fp})
    return join_images(images, t_images), merged, info, both


def _given_splits(cfg: DataConfig, table: pd.DataFrame) -> np.ndarray | None:
    """The split each row is given by a fixed protocol (a ``split`` column, a ``fold``
    column with ``data.split.fold``, or ``data.test``), or None: draw them all."""
    folds = table["fold"].astype(str) if "fold" in table else None
    has_folds = folds is not None and (folds != "").any()
    if cfg.split.fold is not None:
        if not has_folds:
            raise DataError(
                f"data.split.fold={cfg.split.fold} but the manifest has no fold column: add "
                "one (path,age,fold) or remove data.split.fold"
            )
        if not (folds == cfg.split.fold).any():
            found = ", ".join(sorted(set(folds) - {""})[:20])
            raise DataError(f"no row is in fold {cfg.split.fold!r}; the folds are: {found}")
        return np.where(folds == cfg.split.fold, "test", "train").astype("<U9")
    if has_folds and not ("split" in table and (table["split"] != "").any()):
        found = ", ".join(sorted(set(folds) - {""})[:20])
        raise DataError(
            f"the manifest has a fold column (folds: {found}): choose the test fold with "
            "data.split.fold=<fold>"
        )
    if "split" in table and (table["split"] != "").any():
        return table["split"].to_numpy(dtype="<U9")
    return None


def _duplicates(table: pd.DataFrame, info: dict[str, Any]) -> np.ndarray:
    """Content groups of the usable rows; the summary goes to ``info["duplicates"]`` and,
    when there are any, to stderr. Not cached: only files whose size another file shares
    are read, which costs little next to a cache load."""
    groups = content_groups(table["file"].tolist(), table["size"].tolist())
    info["duplicates"] = duplicate_summary(groups, table["path"].tolist(), table["age"].tolist())
    line = format_duplicates(info["duplicates"], table.attrs.get("origin", ""))
    if line:
        print(f"agelab: {line}", file=sys.stderr)
    return groups

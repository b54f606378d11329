"""Data benchmarks: synthetic face generation, and the decoded-tensor cache against decoding
the same JPEG files (goal: a dataset reload from the cache under 1 s for 10,000 images at
64 px). Built on the public API of :mod:`agelab.data`."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["bench_cache", "bench_generate"]


def bench_generate(
    n: int = 10_000, size: int = 64, *, threads: int | None = None, seed: int = 0
) -> float:
    """Images per second for generating ``n`` faces at ``size``² (wall clock)."""
    from agelab.config import SynthConfig
    from agelab.data.synth import generate

    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cfg = SynthConfig(n_images=max(n, 10), seed=seed)
        t0 = time.perf_counter()
        generate(cfg, size)
        return cfg.n_images / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)


def bench_cache(n: int = 10_000, size: int = 64, *, workdir: str | Path | None = None) -> dict:
    """Time the cache against decoding JPEGs, for ``agelab bench``.

    ``build_s``/``reload_s``: save / load (with checksum verification) ``n`` random-but-smooth
    ``size``×``size`` images as a cache entry. Then the same images are written as JPEG files
    with a CSV manifest (``write_jpeg_s``) and loaded with
    :func:`agelab.data.load.load_dataset` twice: the first call decodes every file
    (``decode_jpeg_s``, cache miss), the second is a cache hit (``dataset_reload_s``: manifest
    + validation + fingerprint + cache + split).
    """
    images = _blocky_images(n, size)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="agelab-bench-") as tmp:
        entry = _time_cache_entry(Path(tmp) / "cache", images, n, size)
        files = _time_jpeg_dataset(Path(tmp), images, size)
    return {
        "n": n,
        "size": size,
        "cache_mb": entry["cache_mb"],
        "build_s": entry["build_s"],
        "reload_s": entry["reload_s"],
        "write_jpeg_s": files["write_jpeg_s"],
        "decode_jpeg_s": files["decode_jpeg_s"],
        "dataset_reload_s": files["dataset_reload_s"],
        "speedup": files["speedup"],
    }


def _blocky_images(n: int, size: int) -> np.ndarray:
    """uint8 ``[n, 3, size, size]``: noise upsampled 8×, so JPEG sizes and decode costs are
    realistic (a flat image would compress to nothing)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (n, 3, size // 8 + 1, size // 8 + 1), dtype=np.uint8)
    return np.ascontiguousarray(small.repeat(8, axis=2).repeat(8, axis=3)[:, :, :size, :size])


def _time_cache_entry(folder: Path, images: np.ndarray, n: int, size: int) -> dict[str, float]:
    """Save and reload ``images`` as one cache entry in ``folder``."""
    from agelab.data.cache import entry_key, fingerprint, load_entry, save_entry

    fp = fingerprint({"bench": n, "size": size})
    key = entry_key("bench", fp)
    t0 = time.perf_counter()
    save_entry(folder, key, fp, {"images": images}, {})
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    entry = load_entry(folder, key, fp)
    reload_s = time.perf_counter() - t0
    assert entry is not None and np.array_equal(entry.arrays["images"], images)
    cache_bytes = sum(p.stat().st_size for p in folder.iterdir())
    return {
        "cache_mb": round(cache_bytes / 2**20, 1),
        "build_s": round(build_s, 3),
        "reload_s": round(reload_s, 3),
    }


def _time_jpeg_dataset(tmp: Path, images: np.ndarray, size: int) -> dict[str, float | None]:
    """Write ``images`` as JPEG files with a CSV manifest, then load that dataset twice:
    decoding every file (cache miss), then from the dataset cache (hit)."""
    from PIL import Image

    from agelab.config import DataConfig
    from agelab.data.load import load_dataset

    jpegs = tmp / "jpeg"
    (jpegs / "img").mkdir(parents=True)
    t0 = time.perf_counter()
    lines = ["path,age"]
    for i in range(len(images)):
        Image.fromarray(images[i].transpose(1, 2, 0)).save(jpegs / f"img/{i:06d}.jpg", quality=90)
        lines.append(f"img/{i:06d}.jpg,{i % 90}")
    (jpegs / "labels.csv").write_text("\n".join(lines) + "\n")
    write_jpeg_s = time.perf_counter() - t0
    cfg = DataConfig(
        source="csv", path=jpegs / "labels.csv", image_size=size, cache_dir=tmp / "dataset-cache"
    )
    t0 = time.perf_counter()
    built = load_dataset(cfg, progress=False)
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hit = load_dataset(cfg, progress=False)
    dataset_reload_s = time.perf_counter() - t0
    assert not built.info["cache_hit"] and hit.info["cache_hit"]
    return {
        "write_jpeg_s": round(write_jpeg_s, 3),
        "decode_jpeg_s": round(decode_s, 3),
        "dataset_reload_s": round(dataset_reload_s, 3),
        "speedup": round(decode_s / dataset_reload_s, 1) if dataset_reload_s > 0 else None,
    }

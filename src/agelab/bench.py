"""Micro-benchmark: :func:`agelab.train.fit` throughput against a bare training loop.

Both loops train the same model on the same resident uint8 tensors with no augmentation: the
bare loop is index → normalise → forward → loss → backward → AdamW step, nothing else; ``fit``
adds what the trainer does per step (LR schedule, gradient clipping, non-finite check, loss
accumulation, progress bar). The ratio of their images/s is the trainer's overhead (goal
≥ 0.9). ``fit``'s images/s covers its training steps only (the per-epoch calib evaluation is
excluded), measured over one epoch per repeat after a warm-up epoch of each loop; repeats of
the two loops are interleaved so drifting machine load hits both alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["bench_fit_vs_bare", "main"]


def _dataset(n_train: int, image_size: int, seed: int = 0):
    from agelab.data.dataset import FaceDataset

    rng = np.random.default_rng(seed)
    n_calib = max(8, n_train // 8)
    n = n_train + n_calib
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, image_size, image_size), np.uint8))
    return FaceDataset(
        images=images,
        ages=rng.uniform(1, 90, n).astype(np.float32),
        subjects=np.array([str(i) for i in range(n)]),
        split=np.array(["train"] * n_train + ["calib"] * n_calib),
        fingerprint="bench",
        source="bench",
    )


def _bare_epoch(model, data, cfg, device: torch.device) -> float:
    """One epoch of the bare loop; returns images/s."""
    from agelab.losses import make_loss
    from agelab.train import _fused_ok, _param_groups, _stats

    cuda = device.type == "cuda"
    loss_fn = make_loss(cfg.loss, huber_delta=cfg.huber_delta)
    opt = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=_fused_ok(device)
    )
    images = data.images.to(device)
    ages = torch.from_numpy(data.ages).to(device)
    train = torch.from_numpy(data.indices("train")).to(device)
    mean, std = _stats(device)
    bs = cfg.batch_size
    steps = len(train) // bs
    order = train[torch.randperm(len(train)).to(device)]
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.amp)
    model.train()
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = order[step * bs : (step + 1) * bs]
        x = (images[idx].float().div_(255.0) - mean) / std
        if cuda and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            out = model(x)
        loss = loss_fn(out.float(), ages[idx], model.age_mean, model.age_std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize(device)
    return steps * bs / (time.perf_counter() - t0)


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "all": values,
    }


def bench_fit_vs_bare(
    backbone: str = "resnet10t",
    image_size: int = 64,
    n_images: int = 512,
    batch_size: int = 64,
    repeats: int = 3,
    *,
    device: str = "auto",
    threads: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Images/s of ``fit`` vs the bare loop on ``n_images`` random training images.

    Returns a dict with per-loop min/median/max images/s, ``ratio`` (median fit / median bare),
    the device and the thread count.
    """
    from agelab.config import AugmentConfig, TrainConfig
    from agelab.models import build_model
    from agelab.train import fit, resolve_device

    dev = resolve_device(device)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        data = _dataset(n_images, image_size)
        model, _ = build_model(backbone, "batch", "relu", img_size=image_size, seed=0)
        model.to(dev)
        if dev.type == "cuda":
            model.to(memory_format=torch.channels_last)
        cfg = TrainConfig(
            epochs=1,
            batch_size=batch_size,
            device=str(dev.type),
            augment=AugmentConfig(enabled=False),
            progress=False,
            patience=None,
        )
        fit(model, data, cfg)  # warm-up (allocator, kernels, cudnn autotune)
        _bare_epoch(model, data, cfg, dev)
        fit_ips, bare_ips = [], []
        for _ in range(repeats):
            fit_ips.append(fit(model, data, cfg).images_per_second)
            bare_ips.append(_bare_epoch(model, data, cfg, dev))
    finally:
        if threads:
            torch.set_num_threads(previous_threads)
    result = {
        "backbone": backbone,
        "image_size": image_size,
        "n_images": n_images,
        "batch_size": batch_size,
        "repeats": repeats,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": threads or previous_threads,
        "fit_images_per_second": _summary(fit_ips),
        "bare_images_per_second": _summary(bare_ips),
        "ratio": statistics.median(fit_ips) / statistics.median(bare_ips),
        "ratio_best": max(fit_ips) / max(bare_ips),
    }
    if verbose:
        print(
            f"fit vs bare ({backbone}, {image_size}px, batch {batch_size}, {result['device']}, "
            f"{result['threads']} threads): fit {result['fit_images_per_second']['median']:.1f}"
            f" img/s, bare {result['bare_images_per_second']['median']:.1f} img/s, ratio "
            f"{result['ratio']:.3f} (best-of {result['ratio_best']:.3f})"
        )
    return result


def main(quick: bool = False, out_dir: Path = Path("bench")) -> int:
    """Run the benchmarks side by side and write ``results.json`` / ``results.md``.

    Training: ``fit`` vs a bare forward/backward/step loop on the same resident tensors.
    Data: synthetic generation, cache build and reload vs decoding the same JPEG files.
    """
    from agelab.data.cache import bench_cache
    from agelab.data.synth import bench_generate

    kwargs: dict[str, Any] = {"n_images": 256, "repeats": 2} if quick else {}
    fit = bench_fit_vs_bare(**kwargs)
    n_data = 2_000 if quick else 10_000
    synth_ips = bench_generate(n=n_data, size=64)
    print(f"synthetic generation: {synth_ips:.0f} images/s ({n_data} at 64px)")
    cache = bench_cache(n=n_data, size=64)
    print(
        "cache: "
        + ", ".join(f"{k} {v:.3g}" for k, v in cache.items() if isinstance(v, int | float))
    )
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
        },
        "quick": quick,
        "fit_vs_bare": fit,
        "synthetic": {"n": n_data, "size": 64, "images_per_second": synth_ips},
        "cache": cache,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    f, b = fit["fit_images_per_second"], fit["bare_images_per_second"]
    md = [
        f"Measured {results['date']} on {fit['device_name']} ({os.cpu_count()} cores, "
        f"{fit['threads']} torch threads); `agelab bench{' --quick' if quick else ''}`.",
        "",
        "| benchmark | agelab | baseline | ratio |",
        "|---|---|---|---|",
        f"| training, {fit['backbone']} {fit['image_size']}px batch {fit['batch_size']}: `fit` vs "
        f"bare loop (img/s, median) | {f['median']:.1f} | {b['median']:.1f} | "
        f"{fit['ratio']:.3f} |",
        f"| synthetic faces, {n_data} at 64px (img/s) | {synth_ips:.0f} | | |",
    ]
    md.append(
        f"| dataset load from cache vs decoding the JPEG files, {n_data} at 64px (s) | "
        f"{cache['dataset_reload_s']:.2f} | {cache['decode_jpeg_s']:.2f} | "
        f"{cache['decode_jpeg_s'] / max(cache['dataset_reload_s'], 1e-9):.0f}× faster |"
    )
    md.append(f"| cache entry reload alone (s) | {cache['reload_s']:.2f} | | |")
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0

"""Training throughput: agelab's ``fit`` vs a bare loop vs the naive tutorial pipeline.

All three train the same backbone on the same synthetic faces (no augmentation anywhere):

* **fit** — :func:`agelab.train.fit` on the resident uint8 tensor; its images/s covers the
  training steps only (the per-epoch calib evaluation is excluded).
* **bare** — index → normalise → forward → loss → backward → fused AdamW step on the same
  resident tensor, nothing else: the ceiling for ``fit`` (goal: fit ≥ 0.90 of it).
* **naive** — what most tutorials do: the images are JPEG files read with PIL in a
  ``Dataset.__getitem__``, torchvision transforms (``Resize``, ``ToTensor``, ``Normalize``),
  a shuffling ``DataLoader`` with worker processes (started afresh every epoch, the default),
  the default (unfused) AdamW, ``loss.item()`` and ``mlflow.log_metric`` every step; its
  images/s covers the whole epoch loop, worker start-up included. The JPEG files are written
  at the training size (no resizing work charged to it), or at ``naive_source_size`` (as a
  dataset ships them, e.g. UTKFace's 200 px: decoded and resized every epoch).

One warm-up epoch of each loop, then ``repeats`` rounds of (fit, bare, naive) epochs,
interleaved so drifting machine load hits all three alike; min / median / max reported.
On CUDA :func:`bench_gpu_variants` adds fp32 / bf16 / channels_last / ``torch.compile``.

The naive baseline imports mlflow itself (``mlflow.log_metric`` is the point of it) — an
exception to agelab's rule that only :mod:`agelab.tracking` touches mlflow.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agelab.bench.common import empty_store, mlflow_global_uri, say, summary

__all__ = [
    "FileImages",
    "bench_fit_vs_bare",
    "bench_gpu_variants",
    "bench_training",
    "make_dataset",
    "naive_epoch",
    "write_jpegs",
]


def make_dataset(n_train: int, image_size: int, seed: int = 0):
    """``n_train`` training + ``n_train // 8`` (at least 8) calib synthetic faces."""
    from agelab.config import SynthConfig
    from agelab.data.dataset import FaceDataset
    from agelab.data.synth import generate

    n_calib = max(8, n_train // 8)
    n = n_train + n_calib
    faces = generate(SynthConfig(n_images=max(n, 10), seed=seed), image_size)
    return FaceDataset(
        images=torch.from_numpy(faces.images[:n]),
        ages=faces.ages[:n],
        subjects=np.array([str(s) for s in faces.subjects[:n]]),
        split=np.array(["train"] * n_train + ["calib"] * n_calib),
        fingerprint="bench",
        source="bench",
    )


def write_jpegs(
    data, folder: Path, quality: int = 95, size: int | None = None
) -> tuple[list[str], np.ndarray]:
    """The training images of ``data`` as JPEG files (``size``: upscaled to size² pixels,
    as a dataset's files usually are larger than the training size); returns (paths, ages)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    idx = data.indices("train")
    pixels = data.images[torch.from_numpy(idx)].permute(0, 2, 3, 1).contiguous().numpy()
    paths = []
    for i, img in enumerate(pixels):
        path = folder / f"{i:06d}.jpg"
        picture = Image.fromarray(img)
        if size and size != picture.width:
            picture = picture.resize((size, size), Image.Resampling.BICUBIC)
        picture.save(path, quality=quality)
        paths.append(str(path))
    return paths, np.asarray(data.ages, dtype=np.float32)[idx]


class FileImages(torch.utils.data.Dataset):
    """A tutorial's dataset: every access opens the file with PIL and runs the transforms.

    ``reads`` / ``reads_in_workers`` count files opened (shared with the DataLoader's worker
    processes), so a test can check that the pipeline really reads files in workers."""

    def __init__(self, paths: list[str], ages: np.ndarray, transform: Any):
        import multiprocessing as mp

        self.paths, self.ages, self.transform = list(paths), np.asarray(ages), transform
        self.reads = mp.Value("l", 0)
        self.reads_in_workers = mp.Value("l", 0)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            x = self.transform(img.convert("RGB"))
        with self.reads.get_lock():
            self.reads.value += 1
        if os.getpid() != self._pid:
            with self.reads_in_workers.get_lock():
                self.reads_in_workers.value += 1
        return x, torch.tensor(self.ages[i], dtype=torch.float32)


def naive_loader(
    paths: list[str], ages: np.ndarray, image_size: int, batch_size: int, workers: int
) -> torch.utils.data.DataLoader:
    from torchvision import transforms as T

    from agelab.train import IMAGENET_MEAN, IMAGENET_STD

    transform = T.Compose(
        [
            T.Resize((image_size, image_size)),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return torch.utils.data.DataLoader(
        FileImages(paths, ages, transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
    )


def naive_epoch(model, loader, opt, loss_fn, device: torch.device, step: int = 0) -> tuple:
    """One epoch of the tutorial loop; returns (images/s, next step). Needs an active
    MLflow run (``mlflow.start_run()``): it logs the loss every step."""
    import mlflow

    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    n = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss = loss_fn(out.float(), y, model.age_mean, model.age_std)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mlflow.log_metric("train_loss", loss.item(), step=step)
        step += 1
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / max(time.perf_counter() - t0, 1e-9), step


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


def _train_cfg(batch_size: int, device: torch.device, **extra: Any):
    from agelab.config import AugmentConfig, TrainConfig

    return TrainConfig(
        epochs=1,
        batch_size=batch_size,
        device=str(device.type),
        augment=AugmentConfig(enabled=False),
        progress=False,
        patience=None,
        **extra,
    )


def bench_training(
    backbone: str = "resnet10t",
    image_size: int = 64,
    n_images: int = 512,
    batch_size: int = 64,
    repeats: int = 3,
    *,
    naive: bool = True,
    naive_workers: int = 2,
    naive_source_size: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    data: Any = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Images/s of ``fit``, the bare loop and (``naive=True``) the naive pipeline.

    Returns per-loop min/median/max images/s, ``ratio`` (median fit / median bare),
    ``ratio_best`` (best / best), ``naive_ratio`` / ``naive_ratio_best`` (fit / naive), the
    device and the thread count. ``naive_source_size``: the naive pipeline's JPEG files at
    this size (resized to ``image_size`` by its transforms; default: the training size).
    ``data``: a FaceDataset to use instead of ``n_images`` fresh synthetic faces.
    """
    from agelab.models import build_model
    from agelab.train import fit, resolve_device

    dev = resolve_device(device)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        data = data if data is not None else make_dataset(n_images, image_size)
        image_size = data.image_size
        n_train = len(data.indices("train"))
        model, _ = build_model(backbone, "batch", "relu", img_size=image_size, seed=0)
        model.to(dev)
        if dev.type == "cuda":
            model.to(memory_format=torch.channels_last)
        cfg = _train_cfg(batch_size, dev)
        fit(model, data, cfg)  # warm-up (allocator, kernels, cudnn autotune)
        _bare_epoch(model, data, cfg, dev)
        fit_ips: list[float] = []
        bare_ips: list[float] = []
        naive_ips: list[float] = []
        with (
            tempfile.TemporaryDirectory(prefix="agelab-bench-naive-") as tmp,
            contextlib.ExitStack() as stack,
        ):
            naive_state = None
            if naive:
                naive_state = _naive_setup(
                    Path(tmp),
                    stack,
                    data,
                    backbone,
                    batch_size,
                    naive_workers,
                    naive_source_size,
                    cfg,
                    dev,
                )
                _naive_round(naive_state, dev)  # warm-up
            for _ in range(repeats):
                fit_ips.append(fit(model, data, cfg).images_per_second)
                bare_ips.append(_bare_epoch(model, data, cfg, dev))
                if naive_state:
                    naive_ips.append(_naive_round(naive_state, dev))
            if naive_state:
                _naive_counts(naive_state)
    finally:
        if threads:
            torch.set_num_threads(previous_threads)
    result: dict[str, Any] = {
        "backbone": backbone,
        "image_size": image_size,
        "n_images": n_train,
        "batch_size": batch_size,
        "repeats": repeats,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": threads or previous_threads,
        "fit_images_per_second": summary(fit_ips),
        "bare_images_per_second": summary(bare_ips),
        "ratio": statistics.median(fit_ips) / statistics.median(bare_ips),
        "ratio_best": max(fit_ips) / max(bare_ips),
    }
    if naive_state:
        result["naive_images_per_second"] = summary(naive_ips)
        result["naive_ratio"] = statistics.median(fit_ips) / statistics.median(naive_ips)
        result["naive_ratio_best"] = max(fit_ips) / max(naive_ips)
        result["naive"] = {
            "workers": naive_workers,
            "source_size": naive_source_size or image_size,
            "files": f"JPEG (quality 95), {naive_source_size or image_size}px",
            "optimizer": "torch.optim.AdamW defaults (not fused)",
            "per_step": "loss.item() + mlflow.log_metric",
            "files_read": naive_state["files_read"],
            "files_read_in_workers": naive_state["files_read_in_workers"],
            "mlflow_metric_values_logged": naive_state["logged"],
        }
    if verbose:
        line = (
            f"training {backbone} {image_size}px batch {batch_size} ({result['device']}, "
            f"{result['threads']} threads): fit {result['fit_images_per_second']['median']:.1f}"
            f" img/s, bare {result['bare_images_per_second']['median']:.1f} img/s, fit/bare "
            f"{result['ratio']:.3f} (best-of {result['ratio_best']:.3f})"
        )
        if naive:
            line += (
                f"; naive {result['naive_images_per_second']['median']:.1f} img/s, "
                f"fit/naive {result['naive_ratio']:.2f}× "
                f"(best-of {result['naive_ratio_best']:.2f}×)"
            )
        say(line)
    return result


def _naive_setup(
    tmp: Path, stack, data, backbone, batch_size, workers, source_size, cfg, dev
) -> dict:
    """JPEG files, the loader, a fresh model (NCHW, fp32) with default AdamW, and an active
    MLflow run in a throw-away SQLite store (closed by ``stack``)."""
    import mlflow

    from agelab.losses import make_loss
    from agelab.models import build_model

    paths, ages = write_jpegs(data, tmp / "images", size=source_size)
    loader = naive_loader(paths, ages, data.image_size, batch_size, workers)
    model, _ = build_model(backbone, "batch", "relu", img_size=data.image_size, seed=0)
    model.to(dev)
    train_ages = ages.astype(np.float64)
    model.set_target_stats(float(train_ages.mean()), max(float(train_ages.std()), 1e-6))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    uri = empty_store(tmp / "mlflow.db")  # tables created now, not inside the timing
    stack.enter_context(mlflow_global_uri(uri))
    mlflow.set_experiment("naive-tutorial-loop")
    run = stack.enter_context(mlflow.start_run())
    return {
        "loader": loader,
        "model": model,
        "opt": opt,
        "loss": make_loss(cfg.loss, huber_delta=cfg.huber_delta),
        "step": 0,
        "run_id": run.info.run_id,
        "uri": uri,
    }


def _naive_counts(state: dict) -> None:
    """What the naive loop really did: files read (in workers) and metric values logged."""
    from mlflow.tracking import MlflowClient

    ds = state["loader"].dataset
    state["files_read"] = int(ds.reads.value)
    state["files_read_in_workers"] = int(ds.reads_in_workers.value)
    history = MlflowClient(state["uri"]).get_metric_history(state["run_id"], "train_loss")
    state["logged"] = len(history)


def _naive_round(state: dict, dev: torch.device) -> float:
    ips, state["step"] = naive_epoch(
        state["model"], state["loader"], state["opt"], state["loss"], dev, state["step"]
    )
    return ips


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
    """Images/s of ``fit`` vs the bare loop on ``n_images`` training images (no naive
    pipeline): per-loop min/median/max, ``ratio`` (median fit / median bare), ``ratio_best``,
    the device and the thread count."""
    return bench_training(
        backbone,
        image_size,
        n_images,
        batch_size,
        repeats,
        naive=False,
        device=device,
        threads=threads,
        verbose=verbose,
    )


def bench_gpu_variants(
    backbone: str = "resnet18",
    image_size: int = 128,
    n_images: int = 4096,
    batch_size: int = 256,
    repeats: int = 3,
    *,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """CUDA only: ``fit`` images/s for fp32, bf16, bf16 + channels_last and bf16 +
    channels_last + ``torch.compile``, each with the fraction of the bare loop (bf16 +
    channels_last) measured beside it. Empty without CUDA."""
    if not torch.cuda.is_available():
        return []
    from agelab.models import build_model
    from agelab.train import fit

    dev = torch.device("cuda")
    data = make_dataset(n_images, image_size)
    variants = [
        ("fp32", {"amp": False, "channels_last": False}),
        ("bf16", {"amp": True, "channels_last": False}),
        ("bf16+channels_last", {"amp": True, "channels_last": True}),
        ("bf16+channels_last+compile", {"amp": True, "channels_last": True, "compile": True}),
    ]
    bare_cfg = _train_cfg(batch_size, dev, amp=True, channels_last=True)
    out = []
    for name, extra in variants:
        cfg = _train_cfg(batch_size, dev, **extra)
        model, _ = build_model(backbone, "batch", "relu", img_size=image_size, seed=0)
        model.to(dev)
        bare_model, _ = build_model(backbone, "batch", "relu", img_size=image_size, seed=0)
        bare_model.to(dev).to(memory_format=torch.channels_last)
        fit(model, data, cfg)  # warm-up (and compilation)
        _bare_epoch(bare_model, data, bare_cfg, dev)
        fit_ips, bare_ips = [], []
        for _ in range(repeats):
            fit_ips.append(fit(model, data, cfg).images_per_second)
            bare_ips.append(_bare_epoch(bare_model, data, bare_cfg, dev))
        row = {
            "variant": name,
            "backbone": backbone,
            "image_size": image_size,
            "batch_size": batch_size,
            "fit_images_per_second": summary(fit_ips),
            "bare_images_per_second": summary(bare_ips),
            "fraction_of_bare": statistics.median(fit_ips) / statistics.median(bare_ips),
            "fraction_of_bare_best": max(fit_ips) / max(bare_ips),
            "max_memory_allocated_mb": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1),
        }
        out.append(row)
        if verbose:
            say(
                f"gpu {name}: fit {row['fit_images_per_second']['median']:.0f} img/s, "
                f"{row['fraction_of_bare']:.3f} of the bare loop"
            )
        del model, bare_model
        torch.cuda.empty_cache()
    return out

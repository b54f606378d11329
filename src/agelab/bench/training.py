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
:func:`bench_streaming` compares ``fit`` streaming from memory-mapped shards (a dataset
bigger than ``data.max_resident_gb``) with ``fit`` on the same images resident.

The naive baseline imports mlflow itself (``mlflow.log_metric`` is the point of it) — an
exception to agelab's rule that only :mod:`agelab.tracking` touches mlflow.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agelab.bench.common import empty_store, mlflow_global_uri, say, summary

__all__ = [
    "GPU_VARIANTS",
    "FileImages",
    "bench_fit_vs_bare",
    "bench_gpu_variants",
    "bench_streaming",
    "bench_training",
    "fixed_batch_loop",
    "make_dataset",
    "naive_epoch",
    "streamed_copy",
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
    """One epoch of the bare loop; returns images/s. As many steps of the same size as
    ``fit`` takes (one batch of everything when there are fewer images than a batch)."""
    from agelab.device import autocast, uses_bf16
    from agelab.losses import make_loss
    from agelab.train import _steps_per_epoch, imagenet_stats, make_optimizer

    cuda = device.type == "cuda"
    loss_fn = make_loss(cfg.loss, huber_delta=cfg.huber_delta)
    opt = make_optimizer(model, cfg, device)
    images = data.images.to(device)
    ages = torch.from_numpy(data.ages).to(device)
    train = torch.from_numpy(data.indices("train")).to(device)
    mean, std = imagenet_stats(device)
    steps, bs = _steps_per_epoch(len(train), cfg.batch_size)
    order = train[torch.randperm(len(train)).to(device)]
    amp = autocast(device, cfg.amp)
    channels_last = cfg.channels_last and (cuda or uses_bf16(device, cfg.amp))
    model.train()
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = order[step * bs : (step + 1) * bs]
        x = (images[idx].float().div_(255.0) - mean) / std
        if channels_last:
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


def _fresh_model(backbone: str, image_size: int, dev: torch.device, channels_last: bool = False):
    """The benchmark model (batch norm, ReLU, seed 0) on ``dev``."""
    from agelab.models import build_model

    model, _ = build_model(backbone, "batch", "relu", img_size=image_size, seed=0)
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _interleaved(loops: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """One warm-up round of every loop (allocator, kernels, cudnn autotune, compilation), then
    ``repeats`` rounds, interleaved so drifting machine load hits every loop alike."""
    for run in loops.values():
        run()
    ips: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, run in loops.items():
            ips[name].append(run())
    return ips


def _versus(ips: dict[str, list[float]], a: str, b: str) -> tuple[float, float]:
    """Loop ``a`` against loop ``b``: the ratio of the medians and of the bests."""
    return statistics.median(ips[a]) / statistics.median(ips[b]), max(ips[a]) / max(ips[b])


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """``threads`` torch threads for the duration (unchanged when None or 0)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(previous)


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
    from agelab.train import resolve_device

    dev = resolve_device(device)
    n_threads = threads or torch.get_num_threads()
    naive_options = {"workers": naive_workers, "source_size": naive_source_size}
    with _torch_threads(threads):
        data = data if data is not None else make_dataset(n_images, image_size)
        cfg = _train_cfg(batch_size, dev)
        ips, files = _measure(data, backbone, cfg, dev, repeats, naive_options if naive else None)
    result: dict[str, Any] = {
        "backbone": backbone,
        "image_size": data.image_size,
        "n_images": len(data.indices("train")),
        "batch_size": batch_size,
        "repeats": repeats,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": n_threads,
        "fit_images_per_second": summary(ips["fit"]),
        "bare_images_per_second": summary(ips["bare"]),
    }
    result["ratio"], result["ratio_best"] = _versus(ips, "fit", "bare")
    if naive:
        result["naive_images_per_second"] = summary(ips["naive"])
        result["naive_ratio"], result["naive_ratio_best"] = _versus(ips, "fit", "naive")
        result["naive"] = _naive_facts(naive_workers, naive_source_size or data.image_size, files)
    if verbose:
        say(_training_line(result))
    return result


def _measure(
    data, backbone: str, cfg, dev: torch.device, repeats: int, naive: dict[str, Any] | None
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Interleaved images/s of ``fit`` and the bare loop on one model, and of the naive
    pipeline (``naive``: its workers and source size) on its own; what the naive loop did."""
    from agelab.train import fit

    model = _fresh_model(backbone, data.image_size, dev, channels_last=dev.type == "cuda")
    loops = {
        "fit": lambda: fit(model, data, cfg).images_per_second,
        "bare": lambda: _bare_epoch(model, data, cfg, dev),
    }
    with (
        tempfile.TemporaryDirectory(prefix="agelab-bench-naive-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        pipeline = None
        if naive is not None:
            pipeline = _start_naive(Path(tmp), stack, data, backbone, cfg, dev, **naive)
            loops["naive"] = pipeline.epoch
        ips = _interleaved(loops, repeats)
        return ips, pipeline.counts() if pipeline else {}


def _training_line(r: dict[str, Any]) -> str:
    line = (
        f"training {r['backbone']} {r['image_size']}px batch {r['batch_size']} ({r['device']}, "
        f"{r['threads']} threads): fit {r['fit_images_per_second']['median']:.1f}"
        f" img/s, bare {r['bare_images_per_second']['median']:.1f} img/s, fit/bare "
        f"{r['ratio']:.3f} (best-of {r['ratio_best']:.3f})"
    )
    if "naive" in r:
        line += (
            f"; naive {r['naive_images_per_second']['median']:.1f} img/s, "
            f"fit/naive {r['naive_ratio']:.2f}× "
            f"(best-of {r['naive_ratio_best']:.2f}×)"
        )
    return line


def _naive_facts(workers: int, source_size: int, files: dict[str, int]) -> dict[str, Any]:
    """How the naive pipeline was set up, and what it really did."""
    return {
        "workers": workers,
        "source_size": source_size,
        "files": f"JPEG (quality 95), {source_size}px",
        "optimizer": "torch.optim.AdamW defaults (not fused)",
        "per_step": "loss.item() + mlflow.log_metric",
        **files,
    }


@dataclass
class _NaivePipeline:
    """The naive tutorial loop's state across its epochs."""

    loader: torch.utils.data.DataLoader
    model: Any
    opt: torch.optim.Optimizer
    loss: Any
    device: torch.device
    run_id: str
    uri: str
    step: int = 0

    def epoch(self) -> float:
        """One epoch of the naive loop; returns images/s."""
        ips, self.step = naive_epoch(
            self.model, self.loader, self.opt, self.loss, self.device, self.step
        )
        return ips

    def counts(self) -> dict[str, int]:
        """What the naive loop really did: files read (in workers) and metric values logged."""
        from mlflow.tracking import MlflowClient

        ds = self.loader.dataset
        history = MlflowClient(self.uri).get_metric_history(self.run_id, "train_loss")
        return {
            "files_read": int(ds.reads.value),
            "files_read_in_workers": int(ds.reads_in_workers.value),
            "mlflow_metric_values_logged": len(history),
        }


def _start_naive(
    tmp: Path, stack, data, backbone: str, cfg, dev, *, workers: int, source_size: int | None
) -> _NaivePipeline:
    """JPEG files, the loader, a fresh model (NCHW, fp32) with default AdamW, and an active
    MLflow run in a throw-away SQLite store (closed by ``stack``)."""
    import mlflow

    from agelab.losses import make_loss

    paths, ages = write_jpegs(data, tmp / "images", size=source_size)
    loader = naive_loader(paths, ages, data.image_size, cfg.batch_size, workers)
    model = _fresh_model(backbone, data.image_size, dev)
    train_ages = ages.astype(np.float64)
    model.set_target_stats(float(train_ages.mean()), max(float(train_ages.std()), 1e-6))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    uri = empty_store(tmp / "mlflow.db")  # tables created now, not inside the timing
    stack.enter_context(mlflow_global_uri(uri))
    mlflow.set_experiment("naive-tutorial-loop")
    run = stack.enter_context(mlflow.start_run())
    loss = make_loss(cfg.loss, huber_delta=cfg.huber_delta)
    return _NaivePipeline(loader, model, opt, loss, dev, run.info.run_id, uri)


def bench_fit_vs_bare(
    backbone: str = "resnet10t",
    image_size: int = 64,
    n_images: int = 512,
    batch_size: int = 64,
    repeats: int = 3,
    **options: Any,
) -> dict[str, Any]:
    """Images/s of ``fit`` vs the bare loop on ``n_images`` training images (no naive
    pipeline): :func:`bench_training` with ``naive=False`` (``options``: its ``device``,
    ``threads``, ``verbose``)."""
    return bench_training(
        backbone, image_size, n_images, batch_size, repeats, naive=False, **options
    )


# fit in each precision / layout / compile setting, each against a bare loop in the same one.
GPU_VARIANTS: dict[str, dict[str, bool]] = {
    "fp32": {"amp": False, "channels_last": False},
    "bf16": {"amp": True, "channels_last": False},
    "bf16+channels_last": {"amp": True, "channels_last": True},
    "bf16+channels_last+compile": {"amp": True, "channels_last": True, "compile": True},
}


def bench_gpu_variants(
    backbone: str = "resnet18",
    image_size: int = 128,
    n_images: int = 4096,
    batch_size: int = 256,
    repeats: int = 3,
    *,
    device: str = "cuda",
    data: Any = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """``fit`` images/s for each of :data:`GPU_VARIANTS`, each beside a bare loop in the same
    setting on the same model (:func:`fixed_batch_loop`: forward, backward and a fused AdamW
    step on one batch already on the device), and the variant's peak GPU memory.

    Empty when ``device="cuda"`` and there is no CUDA. ``device="cpu"`` is the dry run of
    ``agelab bench --gpu --device cpu``: the same code, ``amp`` as bf16 autocast on the CPU.
    ``data``: a FaceDataset to use instead of ``n_images`` fresh synthetic faces."""
    if device == "cuda" and not torch.cuda.is_available():
        return []
    dev = torch.device(device)
    data = data if data is not None else make_dataset(n_images, image_size)
    out = []
    for name, extra in GPU_VARIANTS.items():
        if dev.type == "cpu" and extra["amp"]:
            extra = {**extra, "amp": "bf16"}  # what amp: true does on CUDA, on the CPU
        row = _gpu_variant(backbone, data, _train_cfg(batch_size, dev, **extra), repeats)
        out.append({"variant": name, **row})
        if verbose:
            say(
                f"{dev.type} {name}: fit {row['fit_images_per_second']['median']:.0f} img/s, "
                f"{row['fraction_of_bare']:.3f} of the bare loop, peak memory "
                f"{row['max_memory_allocated_mb']} MB"
            )
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the variant's model is gone: start the next one clean
    return out


def fixed_batch_loop(model, data, cfg, device: torch.device) -> Callable[[], float]:
    """The bare loop of a variant: forward, loss, backward and a fused AdamW step on one
    fixed batch, normalised and already on the device, in ``cfg``'s precision, layout and
    compile setting (compiled, it shares ``fit``'s graphs: the same model). No indexing,
    augmentation, clipping, schedule or divergence check: the ceiling for ``fit``. Returns a
    function that runs as many steps as a ``fit`` epoch and returns images/s."""
    from agelab.device import autocast, compile_model, uses_bf16
    from agelab.train import _steps_per_epoch, imagenet_stats, make_loss, make_optimizer

    train = torch.from_numpy(data.indices("train"))
    steps, bs = _steps_per_epoch(len(train), cfg.batch_size)
    mean, std = imagenet_stats(device)
    x = (data.images[train[:bs]].to(device).float().div_(255.0) - mean) / std
    y = torch.from_numpy(np.asarray(data.ages, dtype=np.float32)[train[:bs].numpy()]).to(device)
    if cfg.channels_last and (device.type == "cuda" or uses_bf16(device, cfg.amp)):
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    loss_fn = make_loss(cfg.loss, huber_delta=cfg.huber_delta)
    opt = make_optimizer(model, cfg, device)
    net = compile_model(model) if cfg.compile else model
    amp = autocast(device, cfg.amp)

    def run() -> float:
        model.train()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            with amp:
                out = net(x)
            loss = loss_fn(out.float(), y, model.age_mean, model.age_std)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        return steps * bs / max(time.perf_counter() - t0, 1e-9)

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpu_variant(backbone: str, data, cfg, repeats: int) -> dict[str, Any]:
    """``fit`` with ``cfg`` against :func:`fixed_batch_loop` in the same setting, one fresh
    model; the peak memory of the two (reset first, so each variant has its own)."""
    from agelab.train import fit

    dev = torch.device(cfg.device)
    model = _fresh_model(backbone, data.image_size, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bare = fixed_batch_loop(model, data, cfg, dev)
    ips = _interleaved(
        {"fit": lambda: fit(model, data, cfg).images_per_second, "bare": bare}, repeats
    )
    fraction, fraction_best = _versus(ips, "fit", "bare")
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return {
        "backbone": backbone,
        "image_size": data.image_size,
        "batch_size": cfg.batch_size,
        "n_images": len(data.indices("train")),
        "amp": cfg.amp,
        "channels_last": cfg.channels_last,
        "compile": cfg.compile,
        "fit_images_per_second": summary(ips["fit"]),
        "bare_images_per_second": summary(ips["bare"]),
        "fraction_of_bare": fraction,
        "fraction_of_bare_best": fraction_best,
        "max_memory_allocated_mb": round(peak, 1) if peak is not None else None,
    }


def streamed_copy(data, folder: Path, shards: int = 4):
    """``data`` with its images written to a shard store in ``folder`` (``shards`` shards)
    and read back memory-mapped: what a dataset bigger than ``data.max_resident_gb`` trains
    from. Labels and splits are shared."""
    import dataclasses

    from agelab.data.cache import fingerprint
    from agelab.data.shards import ShardWriter, build_in_chunks

    images = data.images.numpy()
    n = len(images)
    writer = ShardWriter(folder, "bench", fingerprint({"bench": n}), n, data.image_size,
                         rows=max(1, -(-n // shards)))  # fmt: skip
    store = writer.finish(build_in_chunks(writer, lambda a, b: (images[a:b], {})), {}, {})
    return dataclasses.replace(data, images=store.images)


def bench_streaming(
    backbone: str = "mobilenetv3_small_100",
    image_size: int = 64,
    n_images: int = 192,
    batch_size: int = 64,
    repeats: int = 3,
    *,
    device: str = "auto",
    threads: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Training images/s of ``fit`` streaming from memory-mapped shards (a prefetch thread
    gathering the next batches) against ``fit`` on the same images held resident: the
    two interleaved on one model, warm-up first. The shards sit in the page cache after
    the warm-up, so this is the streaming path's own cost, not the disk's."""
    from agelab.train import fit, resolve_device

    dev = resolve_device(device)
    with _torch_threads(threads), tempfile.TemporaryDirectory(prefix="agelab-bench-") as tmp:
        data = make_dataset(n_images, image_size)
        streamed = streamed_copy(data, Path(tmp))
        cfg = _train_cfg(batch_size, dev)
        model = _fresh_model(backbone, image_size, dev, channels_last=dev.type == "cuda")
        paths: dict[str, str] = {}

        def run(d, name: str) -> float:
            result = fit(model, d, cfg)
            paths[name] = result.data_path
            return result.images_per_second

        ips = _interleaved(
            {
                "streaming": lambda: run(streamed, "streaming"),
                "resident": lambda: run(data, "resident"),
            },
            repeats,
        )
        n_shards = len(streamed.images.shards)
    result = {
        "backbone": backbone,
        "image_size": image_size,
        "n_images": len(data.indices("train")),
        "batch_size": batch_size,
        "repeats": repeats,
        "device": str(dev),
        "threads": threads or torch.get_num_threads(),
        "shards": n_shards,
        "paths": paths,
        "streaming_images_per_second": summary(ips["streaming"]),
        "resident_images_per_second": summary(ips["resident"]),
    }
    result["ratio"], result["ratio_best"] = _versus(ips, "streaming", "resident")
    if verbose:
        say(
            f"streaming {backbone} {image_size}px batch {batch_size} ({dev}, {n_shards} shards): "
            f"{result['streaming_images_per_second']['median']:.1f} img/s vs resident "
            f"({paths.get('resident')}) {result['resident_images_per_second']['median']:.1f} "
            f"img/s, ratio {result['ratio']:.3f} (best-of {result['ratio_best']:.3f})"
        )
    return result

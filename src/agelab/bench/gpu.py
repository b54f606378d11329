"""``agelab bench --gpu`` (``make bench-gpu``): the GPU path's speed, in minutes on one GPU.

Printed, and written to ``<out>/gpu.json`` and ``<out>/gpu.md``:

1. **variants** — ``fit`` images/s in fp32, bf16, bf16 + channels_last and bf16 +
   channels_last + ``torch.compile``, each with the fraction of a bare loop in the same
   setting (forward, backward and a fused AdamW step on one batch already on the device:
   :func:`~agelab.bench.training.fixed_batch_loop`) and the variant's peak GPU memory;
2. **loader** — ``fit`` on device-resident images against the same training (bf16 +
   channels_last, fused AdamW, same model) fed by a plain ``torch.utils.data.DataLoader``
   over the decoded uint8 images (shuffled, pinned, persistent workers, one host-to-device
   copy per batch): what the resident data path is worth;
3. **naive** — ``fit`` against the naive tutorial pipeline of ``agelab bench`` (JPEG files
   read with PIL in DataLoader workers, unfused AdamW, ``.item()`` and
   ``mlflow.log_metric`` every step; :func:`~agelab.bench.training.bench_training`).

Without CUDA it refuses: a :class:`~agelab.errors.DeviceError` naming the reason (the CLI
prints it on one line and exits 2). ``--device cpu`` is a dry run of the same code at tiny
sizes (bf16 autocast on the CPU, ``torch.compile`` with the ``aot_eager`` backend unless
``AGELAB_COMPILE_BACKEND`` says otherwise): it checks the script, it measures no GPU.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agelab.bench.common import machine, say, summary
from agelab.bench.training import (
    _fresh_model,
    _interleaved,
    _sync,
    _train_cfg,
    _versus,
    bench_gpu_variants,
    bench_training,
    make_dataset,
)
from agelab.errors import DeviceError

__all__ = ["DRY_RUN", "PLAN", "bench_loader", "main"]

#: One CUDA GPU: resnet18 at 128 px, 4,096 training images, batch 256 (a few minutes, most
#: of it ``torch.compile``).
PLAN: dict[str, Any] = {
    "backbone": "resnet18",
    "image_size": 128,
    "n_images": 4096,
    "batch_size": 256,
    "repeats": 3,
    "loader_workers": 4,
    "naive_workers": 4,
}
#: ``--device cpu``: the same code at tiny sizes (a dry run; the figures mean nothing).
DRY_RUN: dict[str, Any] = {
    "backbone": "resnet10t",
    "image_size": 32,
    "n_images": 48,
    "batch_size": 16,
    "repeats": 1,
    "loader_workers": 0,
    "naive_workers": 1,
}


def main(device: str = "cuda", out_dir: Path = Path("bench"), plan: dict | None = None) -> int:
    """Run the GPU benchmark on ``device`` (``cuda``, or ``cpu`` for the dry run), print
    the table, write ``gpu.json`` / ``gpu.md`` to ``out_dir``. Raises :class:`DeviceError`
    when ``device`` is ``cuda`` and CUDA is not usable."""
    dev = _device(device)
    plan = {**(PLAN if dev.type == "cuda" else DRY_RUN), **(plan or {})}
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": f"agelab bench --gpu{' --device cpu' if dev.type == 'cpu' else ''}",
        "dry_run": dev.type != "cuda",
        "machine": {**machine(), **_cuda_facts()},
        "plan": plan,
    }
    say(f"{results['command']}: {_device_line(results['machine'], dev)}")
    with _compile_backend("aot_eager" if dev.type == "cpu" else None):
        results.update(_measure(plan, dev))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = markdown(results)
    (out_dir / "gpu.md").write_text(md)
    say("")
    say(md.rstrip())
    say(f"\nwrote {out_dir / 'gpu.json'} and {out_dir / 'gpu.md'}")
    return 0


def _device(device: str) -> torch.device:
    """``cuda`` (refused without a usable GPU, with the reason) or ``cpu`` (the dry run)."""
    from agelab.device import cuda_unusable_reason

    if device not in ("cuda", "cpu"):
        raise DeviceError(f"agelab bench --gpu: --device must be cuda or cpu, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        reason = cuda_unusable_reason() or (
            f"torch {torch.__version__} sees no CUDA GPU on this machine"
            + ("" if torch.version.cuda else " (a CPU-only build)")
        )
        raise DeviceError(
            f"agelab bench --gpu needs a CUDA GPU: {reason}. `agelab bench --gpu --device cpu` "
            "runs the same script on the CPU as a dry run (no GPU figures)"
        )
    return torch.device(device)


def _cuda_facts() -> dict[str, Any]:
    from agelab.device import nvidia_driver_version

    return {
        "cuda_build": torch.version.cuda,
        "driver": nvidia_driver_version(),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if torch.cuda.is_available()
        else None,
    }


def _device_line(m: dict[str, Any], dev: torch.device) -> str:
    if dev.type == "cpu":
        return f"DRY RUN on the CPU ({m['cpu']}, {m['torch_threads']} threads): no GPU figures"
    return (
        f"{m['gpu']} ({m['gpu_memory_gib']} GiB), driver {m['driver']}, torch {m['torch']} "
        f"(CUDA {m['cuda_build']})"
    )


@contextlib.contextmanager
def _compile_backend(backend: str | None) -> Iterator[None]:
    """``torch.compile``'s backend for the duration (None: leave it)."""
    import os

    from agelab import device as device_mod

    previous = device_mod.COMPILE_BACKEND
    if backend is not None and "AGELAB_COMPILE_BACKEND" not in os.environ:
        device_mod.COMPILE_BACKEND = backend
    try:
        yield
    finally:
        device_mod.COMPILE_BACKEND = previous


def _measure(plan: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    """The three sections on one synthetic dataset."""
    size, bs, repeats = plan["image_size"], plan["batch_size"], plan["repeats"]
    data = make_dataset(plan["n_images"], size)
    out: dict[str, Any] = {}
    t = time.perf_counter()
    out["variants"] = bench_gpu_variants(
        plan["backbone"], size, batch_size=bs, repeats=repeats, device=dev.type, data=data
    )
    out["variants_seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    out["loader"] = bench_loader(
        plan["backbone"], data, bs, repeats, device=dev, workers=plan["loader_workers"]
    )
    out["loader_seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    out["naive"] = bench_training(
        plan["backbone"], size, batch_size=bs, repeats=repeats, data=data,
        naive_workers=plan["naive_workers"], device=dev.type,
    )  # fmt: skip
    out["naive_seconds"] = round(time.perf_counter() - t, 1)
    return out


# ---------------------------------------------------------------------- loader baseline


def bench_loader(
    backbone: str,
    data: Any,
    batch_size: int,
    repeats: int,
    *,
    device: torch.device,
    workers: int = 4,
    verbose: bool = True,
) -> dict[str, Any]:
    """``fit`` (images resident on the device) against the same training fed by a plain
    ``DataLoader`` over the decoded uint8 images: bf16 (on the CPU: bf16 autocast) +
    channels_last, the same fused AdamW, one model for both, interleaved after a warm-up."""
    from agelab.train import fit

    amp: bool | str = True if device.type == "cuda" else "bf16"
    cfg = _train_cfg(batch_size, device, amp=amp, channels_last=True)
    model = _fresh_model(backbone, data.image_size, device)
    loader = _loader_loop(model, data, cfg, device, workers)
    ips = _interleaved(
        {"fit": lambda: fit(model, data, cfg).images_per_second, "loader": loader}, repeats
    )
    ratio, ratio_best = _versus(ips, "fit", "loader")
    result = {
        "backbone": backbone,
        "image_size": data.image_size,
        "batch_size": cfg.batch_size,
        "workers": workers,
        "fit_images_per_second": summary(ips["fit"]),
        "loader_images_per_second": summary(ips["loader"]),
        "ratio": ratio,
        "ratio_best": ratio_best,
    }
    if verbose:
        say(
            f"loader: fit {result['fit_images_per_second']['median']:.0f} img/s vs plain "
            f"DataLoader ({workers} workers) {result['loader_images_per_second']['median']:.0f}"
            f" img/s: {ratio:.2f}× (best-of {ratio_best:.2f}×)"
        )
    return result


def _loader_loop(model, data, cfg, device: torch.device, workers: int) -> Callable[[], float]:
    """One epoch of the DataLoader-fed loop per call; returns images/s."""
    from agelab.device import autocast
    from agelab.train import _steps_per_epoch, imagenet_stats, make_loss, make_optimizer

    train = torch.from_numpy(data.indices("train"))
    ages = torch.from_numpy(np.asarray(data.ages, dtype=np.float32))
    _, bs = _steps_per_epoch(len(train), cfg.batch_size)
    dataset = torch.utils.data.TensorDataset(data.images[train], ages[train])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=bs, shuffle=True, drop_last=True, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )  # fmt: skip
    model.to(device, memory_format=torch.channels_last)
    train_ages = ages[train].double()
    model.set_target_stats(float(train_ages.mean()), max(float(train_ages.std()), 1e-6))
    loss_fn = make_loss(cfg.loss, huber_delta=cfg.huber_delta)
    opt = make_optimizer(model, cfg, device)
    mean, std = imagenet_stats(device)
    amp = autocast(device, cfg.amp)

    def run() -> float:
        model.train()
        _sync(device)
        t0, n = time.perf_counter(), 0
        for xb, yb in loader:
            x = (xb.to(device, non_blocking=True).float().div_(255.0) - mean) / std
            x = x.contiguous(memory_format=torch.channels_last)
            with amp:
                out = model(x)
            loss = loss_fn(out.float(), yb.to(device, non_blocking=True), model.age_mean,
                           model.age_std)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(xb)
        _sync(device)
        return n / max(time.perf_counter() - t0, 1e-9)

    return run


# ------------------------------------------------------------------------------- table


def markdown(results: dict[str, Any]) -> str:
    """The header line, one table row per measurement and the notes."""
    m = results["machine"]
    where = (
        f"DRY RUN on the CPU ({m['cpu']}): checks the script, measures no GPU"
        if results["dry_run"]
        else f"{m['gpu']}, driver {m['driver']}, torch {m['torch']} (CUDA {m['cuda_build']})"
    )
    lines = [
        f"Measured {results['date']} by `{results['command']}` in "
        f"{results['seconds'] / 60:.1f} min on {where}.",
        "",
        "| measured | `fit` img/s | baseline img/s | ratio (best-of, median) | peak MB |",
        "|---|---|---|---|---|",
    ]
    for g in results["variants"]:
        lines.append(
            f"| {g['variant']}: `fit` vs bare loop (same setting, fixed batch on the device) | "
            f"{_ips(g['fit_images_per_second'])} | {_ips(g['bare_images_per_second'])} | "
            f"{g['fraction_of_bare_best']:.3f} ({g['fraction_of_bare']:.3f}) | "
            f"{_mb(g['max_memory_allocated_mb'])} |"
        )
    lo = results["loader"]
    lines.append(
        f"| bf16+channels_last: `fit` (resident) vs plain DataLoader over decoded images "
        f"({lo['workers']} workers, pinned) | {_ips(lo['fit_images_per_second'])} | "
        f"{_ips(lo['loader_images_per_second'])} | {lo['ratio_best']:.2f}× ({lo['ratio']:.2f}×)"
        " | |"
    )
    nv = results["naive"]
    lines.append(
        f"| `fit` vs naive pipeline (JPEG + PIL, DataLoader {nv['naive']['workers']} workers, "
        f"`.item()` + `mlflow.log_metric` per step) | {_ips(nv['fit_images_per_second'])} | "
        f"{_ips(nv['naive_images_per_second'])} | {nv['naive_ratio_best']:.2f}× "
        f"({nv['naive_ratio']:.2f}×) | |"
    )
    p = results["plan"]
    lines += [
        "",
        f"- {p['backbone']} at {p['image_size']} px, batch {p['batch_size']}, "
        f"{results['variants'][0]['n_images']} training images, {p['repeats']} interleaved "
        "repeats after a warm-up (compilation happens there); throughput: median (best).",
        "- The bare loop runs the variant's model in the variant's setting on one fixed batch "
        "already on the device: forward, loss, backward, fused AdamW step, nothing else.",
    ]
    return "\n".join(lines) + "\n"


def _ips(s: dict[str, Any]) -> str:
    return f"{s['median']:.0f} ({s['max']:.0f})"


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"

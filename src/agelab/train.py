"""Trainer: ``fit`` a model on a :class:`~agelab.data.dataset.FaceDataset`, ``predict`` ages,
save/load checkpoints.

Design points (details in ``docs/models.md``):

* The whole uint8 image tensor goes to the device once (when it fits in half the free GPU
  memory; otherwise batches are gathered on the host, pinned and copied ``non_blocking``).
  A dataset bigger than ``data.max_resident_gb`` stays on disk (memory-mapped shards): a
  background thread gathers the next batches, the same ones in the same order.
  Batches are indexed on the device; augmentation is batched tensor work on the device (one
  ``affine_grid`` + ``grid_sample`` per batch for flip/scale/shift/rotate, then
  brightness/contrast) — no per-image Python, no PIL.
* CUDA: bf16 autocast, channels_last, optional ``torch.compile``, cudnn.benchmark (the same
  on the CPU with ``train.amp: bf16``; see :mod:`agelab.device`). The head, the loss, the
  ages and every metric are fp32 whatever the training precision. AdamW is the fused
  implementation on CUDA and CPU (on CPU ~4× faster per step than the default).
  The step loop never waits for the GPU except every ``NONFINITE_CHECK_EVERY`` steps (to read
  the non-finite flag) and once per epoch (metrics). On CPU the loss is checked every step
  (free: CPU ops are synchronous anyway).
* AdamW without weight decay on params with ``ndim <= 1`` (norm affine, biases, SkipInit and
  LayerScale gains) nor on those timm lists in ``no_weight_decay()`` (ViT pos/cls embeddings);
  linear warm-up then cosine, stepped per batch; gradient clipping; early stopping on calib MAE
  with the best weights restored.
* Reproducible on CPU: python/numpy/torch seeds, data order from its own ``torch.Generator``,
  augmentation from another one on the device.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agelab.data.prefetch import Prefetcher
from agelab.data.shards import ShardedImages
from agelab.device import (
    autocast,
    compile_guard,
    compile_model,
    exact_fp32,
    resolve_device,
    uses_bf16,
)
from agelab.errors import CheckpointError, TrainingDiverged
from agelab.faults import kill_point
from agelab.losses import AgeLoss, make_loss
from agelab.models import AgeRegressor, rebuild_model

__all__ = [
    "Callback",
    "FitResult",
    "augment_batch",
    "fit",
    "fused_adamw_ok",
    "imagenet_stats",
    "load_checkpoint",
    "make_optimizer",
    "param_groups",
    "predict",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NONFINITE_CHECK_EVERY = 32  # CUDA: steps between reads of the non-finite flag (one sync each)
RESIDENT_FRACTION = 0.5  # CUDA: keep images on the GPU when they need < this share of free memory
PREFETCH_DEPTH = 3  # streamed data: batches gathered ahead of the one training
CHECKPOINT_FORMAT = "agelab-checkpoint"
CHECKPOINT_VERSION = 1


class Callback(Protocol):
    """Called once per epoch with the metrics dict (``epoch``, ``train_loss``, ``calib_mae``,
    ``lr``, ``epoch_seconds``, ``images_per_second``). Raising stops training: the exception
    propagates unchanged (e.g. ``optuna.TrialPruned``) and the best weights are *not*
    restored."""

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None: ...


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_calib_mae: float = math.inf
    stopped_early: bool = False
    seconds: float = 0.0
    images_per_second: float = 0.0  # training steps only (augmentation included, eval excluded)
    device: str = "cpu"
    data_path: str = "resident-host"  # or resident-device, streaming (see _Images)


# ------------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] (or float in [0, 1]) → ImageNet-normalised float32."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    return (x - mean) / std


def imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as ``[1, 3, 1, 1]`` tensors on ``device`` (pixels in [0, 1])."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def augment_batch(x: torch.Tensor, aug: Any, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random flip/scale/shift/rotate and brightness/contrast of a float batch in [0, 1].

    All on ``x.device`` with batched ops: the geometric part is one ``affine_grid`` +
    ``grid_sample`` (a flip is a sign in the affine matrix). ``aug`` is an
    :class:`~agelab.config.AugmentConfig`. Seven uniforms are drawn per image whatever the
    options, so the random stream does not depend on which options are on.
    """
    b = x.shape[0]
    r = torch.rand(b, 7, generator=gen, device=x.device)
    sign = torch.where(r[:, 0] < 0.5, -1.0, 1.0) if aug.flip else torch.ones(b, device=x.device)
    if aug.shift > 0 or aug.scale > 0 or aug.rotate > 0:
        angle = (r[:, 1] * 2 - 1) * math.radians(aug.rotate)
        zoom = 1 + (r[:, 2] * 2 - 1) * aug.scale  # > 1 zooms in
        tx = (r[:, 3] * 2 - 1) * aug.shift * 2  # normalised coordinates span 2
        ty = (r[:, 4] * 2 - 1) * aug.shift * 2
        cos, sin = angle.cos() / zoom, angle.sin() / zoom
        theta = torch.stack([
            torch.stack([cos * sign, -sin, tx], dim=-1),
            torch.stack([sin * sign, cos, ty], dim=-1),
        ], dim=1)  # fmt: skip
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    elif aug.flip:
        x = torch.where((sign < 0).view(b, 1, 1, 1), x.flip(-1), x)
    if aug.brightness > 0 or aug.contrast > 0:
        contrast = (1 + (r[:, 5] * 2 - 1) * aug.contrast).view(b, 1, 1, 1)
        bright = ((r[:, 6] * 2 - 1) * aug.brightness).view(b, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean + bright).clamp_(0.0, 1.0)
    return x


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: ``weight_decay`` on matrices and kernels; none on params with
    ``ndim <= 1`` (norm affine, biases, SkipInit/LayerScale gains) nor on those the backbone
    lists in ``no_weight_decay()`` (ViT position/class embeddings)."""
    skip: set[str] = set()
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "no_weight_decay"):
        skip = {f"backbone.{n}" for n in backbone.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_adamw_ok(device: torch.device) -> bool | None:
    """Fused AdamW exists for CUDA and CPU tensors; elsewhere let torch choose."""
    return True if device.type in ("cuda", "cpu") else None


def make_optimizer(model: nn.Module, cfg: Any, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``cfg.lr`` / ``cfg.weight_decay`` (a
    :class:`~agelab.config.TrainConfig`), fused where torch has it."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=fused_adamw_ok(device)
    )


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to 0 at ``total`` (step is 0-based:
    the factor for the update about to be made)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _Images:
    """The dataset images on the device (``resident-device``), on the host with pinned batch
    copies (``resident-host``), or memory-mapped shards on disk (``streaming``: a
    :class:`~agelab.data.shards.ShardedImages`), whose batches a background thread gathers
    ahead — into pinned buffers on CUDA — once :meth:`prefetch` announced them.

    :meth:`take` returns the same batch whichever the path (prefetched or not), so
    augmentation, normalisation and results do not depend on it. :meth:`close` ends a
    prefetch thread (idempotent; the owner calls it when the announced batches are done or
    abandoned)."""

    def __init__(self, images: Any, device: torch.device):
        self.device = device
        self.resident = isinstance(images, torch.Tensor)
        self.path = "resident-host" if self.resident else "streaming"
        self._ahead: Prefetcher | None = None
        if self.resident and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if images.numel() < RESIDENT_FRACTION * free:
                images = images.to(device, non_blocking=True)
                self.path = "resident-device"
            else:
                self.resident = False
        self.images = images.contiguous() if isinstance(images, torch.Tensor) else images

    def index_device(self, ids: torch.Tensor) -> torch.Tensor:
        """Where batch indices should live (the device if resident, else the host)."""
        return ids.to(self.device if self.resident else torch.device("cpu"))

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        if self.resident:
            return self.images[idx]
        if self.path == "streaming":
            batch = self._prefetched(idx)
        else:
            batch = self.images.index_select(0, idx).pin_memory()
        return batch.to(self.device, non_blocking=True)

    def prefetch(self, batches: Sequence[torch.Tensor]) -> None:
        """The index batches :meth:`take` will be asked for next, in order (streaming only)."""
        self.close()
        if self.path == "streaming" and len(batches):
            self._ahead = Prefetcher(lambda idx: (idx, self._gather(idx)), batches, PREFETCH_DEPTH)

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Read a batch from the shards (into a pinned buffer on CUDA)."""
        pin = self.device.type == "cuda"
        out = torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        self.images.gather(idx, out=out.numpy())
        return out

    def _prefetched(self, idx: torch.Tensor) -> torch.Tensor:
        """The next announced batch when it is ``idx``; else read now (and stop prefetching)."""
        if self._ahead is not None:
            planned, batch = next(self._ahead, (None, None))
            if planned is not None and torch.equal(planned, idx):
                return batch
            self.close()
        return self._gather(idx)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None


# -------------------------------------------------------------------------------------- fit


def _resolve_loss(model: AgeRegressor, name: str, cfg: Any) -> AgeLoss:
    if name == "dex":
        if model.out_dim < 2:
            raise ValueError(
                "loss 'dex' needs a head with one output per age bin; build the "
                "model with out_dim = max_age + 1 (build_model_from_config(..., "
                "loss='dex') does this)"
            )
        return make_loss("dex", max_age=model.out_dim - 1)
    loss = make_loss(name, huber_delta=cfg.huber_delta)
    if model.out_dim != loss.head_dim:
        raise ValueError(
            f"loss {name!r} needs a {loss.head_dim}-output head but the model has "
            f"{model.out_dim} outputs"
        )
    return loss


def fit(
    model: AgeRegressor,
    data: Any,
    cfg: Any,
    callbacks: Sequence[Callback] = (),
    *,
    loss_name: str | None = None,
) -> FitResult:
    """Train ``model`` on the ``train`` split of ``data`` (a FaceDataset) with ``cfg`` (a
    :class:`~agelab.config.TrainConfig`); early-stop on ``calib`` MAE and restore the best
    weights. ``loss_name`` overrides ``cfg.loss``.

    Raises :class:`TrainingDiverged` on a NaN/inf loss; exceptions raised by callbacks
    propagate unchanged (best weights not restored).
    """
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with compile_guard(cfg.compile):  # a recompile-limit hit raises, never runs eager
            return _fit(model, data, cfg, callbacks, loss_name or cfg.loss)
    finally:
        if cfg.threads:
            torch.set_num_threads(previous_threads)


@dataclass
class _Loop:
    """What the epoch loop reads, set up once per :func:`fit` by :func:`_setup`."""

    cfg: Any
    model: AgeRegressor
    net: nn.Module  # the model, compiled when cfg.compile
    loss_fn: AgeLoss
    device: torch.device
    channels_last: bool
    amp: torch.autocast
    images: _Images
    ages: torch.Tensor  # every image's age, on the device
    train_ids: torch.Tensor
    calib_ids: torch.Tensor
    mean_px: torch.Tensor
    std_px: torch.Tensor
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    params: list[nn.Parameter]
    aug: Any  # the AugmentConfig, or None when augmentation is off
    order_gen: torch.Generator  # data order (CPU)
    aug_gen: torch.Generator  # augmentation draws (on the device)
    steps: int  # per epoch
    batch_size: int
    warmup: int  # steps
    total: int  # steps
    global_step: int = 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _fit(
    model: AgeRegressor, data: Any, cfg: Any, callbacks: Iterable[Callback], loss_name: str
) -> FitResult:
    t_start = time.perf_counter()
    loop = _setup(model, data, cfg, loss_name)
    result = FitResult(device=str(loop.device), data_path=loop.images.path)
    best_state: dict[str, torch.Tensor] | None = None
    since_best = 0
    train_seconds, train_images = 0.0, 0
    for epoch in range(1, cfg.epochs + 1):
        metrics, seconds_train = _epoch(loop, epoch)
        train_seconds += seconds_train
        train_images += loop.steps * loop.batch_size
        result.history.append(metrics)
        if metrics["calib_mae"] < result.best_calib_mae:
            result.best_calib_mae, result.best_epoch, since_best = metrics["calib_mae"], epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
        for cb in callbacks:
            cb(epoch, dict(metrics))  # may raise (pruning): propagates as is
        if cfg.patience is not None and since_best >= cfg.patience and epoch < cfg.epochs:
            result.stopped_early = True
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - t_start
    result.images_per_second = train_images / max(train_seconds, 1e-9)
    return result


def _splits(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """The train and calib indices; training needs two images and a calib split."""
    train_idx, calib_idx = data.indices("train"), data.indices("calib")
    if len(train_idx) < 2:
        raise ValueError(f"the train split has {len(train_idx)} image(s); need at least 2")
    if len(calib_idx) == 0:
        raise ValueError("the calib split is empty: early stopping and model selection need it")
    return train_idx, calib_idx


def _prepare_model(
    model: AgeRegressor, train_ages: np.ndarray, loss_name: str, cfg: Any, device: torch.device
) -> tuple[AgeLoss, bool]:
    """Attach the loss and the training-age statistics, move the model to ``device``; returns
    the loss and whether batches go channels_last."""
    train_ages = train_ages.astype(np.float64)
    std = float(train_ages.std())
    model.set_target_stats(float(train_ages.mean()), std if std > 1e-6 else 1.0)
    loss_fn = _resolve_loss(model, loss_name, cfg)
    model.loss = loss_fn
    model.to(device)
    # channels_last where it pays: CUDA, and CPU bf16 (oneDNN's bf16 convolutions want it)
    channels_last = cfg.channels_last and (device.type == "cuda" or uses_bf16(device, cfg.amp))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return loss_fn, channels_last


def _steps_per_epoch(n_train: int, batch_size: int) -> tuple[int, int]:
    """(steps, batch size): full batches only, or one batch of everything when there are
    fewer images than a batch."""
    # drop_last: a trailing batch of one image breaks BatchNorm (and skews the loss mean).
    steps = max(1, n_train // batch_size) if n_train >= batch_size else 1
    return steps, min(batch_size, n_train)


def _setup(model: AgeRegressor, data: Any, cfg: Any, loss_name: str) -> _Loop:
    """Seed everything, then data, model, optimiser and schedule on the device."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    train_idx, calib_idx = _splits(data)
    ages_np = np.asarray(data.ages, dtype=np.float32)
    loss_fn, channels_last = _prepare_model(model, ages_np[train_idx], loss_name, cfg, device)
    images = _Images(data.images, device)
    mean_px, std_px = imagenet_stats(device)
    opt = make_optimizer(model, cfg, device)
    steps, batch_size = _steps_per_epoch(len(train_idx), cfg.batch_size)
    total, warmup = steps * cfg.epochs, round(cfg.warmup_epochs * steps)
    return _Loop(
        cfg=cfg,
        model=model,
        net=compile_model(model) if cfg.compile else model,
        loss_fn=loss_fn,
        device=device,
        channels_last=channels_last,
        amp=autocast(device, cfg.amp),
        images=images,
        ages=torch.from_numpy(ages_np).to(device),
        train_ids=images.index_device(torch.from_numpy(train_idx)),
        calib_ids=torch.from_numpy(calib_idx),
        mean_px=mean_px,
        std_px=std_px,
        opt=opt,
        sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, total)),
        params=[p for p in model.parameters() if p.requires_grad],
        aug=cfg.augment if cfg.augment.enabled else None,
        order_gen=torch.Generator().manual_seed(cfg.seed),
        aug_gen=torch.Generator(device=device).manual_seed(cfg.seed + 1),
        steps=steps,
        batch_size=batch_size,
        warmup=warmup,
        total=total,
    )


def _epoch(loop: _Loop, epoch: int) -> tuple[dict[str, float], float]:
    """Train one epoch, then measure the calib MAE; returns the epoch's metrics and the
    seconds its training steps took."""
    t_epoch = time.perf_counter()
    bar = _progress_bar(loop, epoch)
    try:
        loss_sum = _train_steps(loop, epoch, bar)
    except BaseException:  # Ctrl-C: close the bar, or it redraws after the last message
        bar.close()
        raise
    finally:
        loop.images.close()  # streamed data: the prefetch thread ends with the steps
    if loop.cuda:
        torch.cuda.synchronize(loop.device)  # honest timing; the epoch-end read syncs anyway
    seconds_train = time.perf_counter() - t_epoch
    try:
        calib_mae_t = _calib_mae(loop)
    finally:
        loop.images.close()
    # One read of both numbers: the only sync of the epoch on CUDA.
    train_loss, calib_mae = torch.stack([loss_sum / loop.steps, calib_mae_t]).tolist()
    bar.set_postfix(loss=f"{train_loss:.4f}", calib_mae=f"{calib_mae:.3f}")
    bar.close()
    if not math.isfinite(calib_mae) or not math.isfinite(train_loss):
        raise TrainingDiverged(
            epoch,
            loop.steps,
            loop.sched.get_last_lr()[0],
            f"non-finite epoch metrics (train loss {train_loss}, calib MAE {calib_mae})",
        )
    metrics = {
        "epoch": epoch,
        "train_loss": train_loss,
        "calib_mae": calib_mae,
        "lr": loop.sched.get_last_lr()[0],
        "epoch_seconds": time.perf_counter() - t_epoch,
        "images_per_second": loop.steps * loop.batch_size / max(seconds_train, 1e-9),
    }
    return metrics, seconds_train


def _progress_bar(loop: _Loop, epoch: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=loop.steps,
        desc=f"epoch {epoch}/{loop.cfg.epochs}",
        unit="batch",
        disable=not loop.cfg.progress,
        leave=False,
        dynamic_ncols=True,
    )


def _train_steps(loop: _Loop, epoch: int, bar: Any) -> torch.Tensor:
    """The training steps of one epoch; returns the summed loss, left on the device."""
    loop.model.train()
    n_train, bs = len(loop.train_ids), loop.batch_size
    order = loop.train_ids[
        torch.randperm(n_train, generator=loop.order_gen).to(loop.train_ids.device)
    ]
    loop.images.prefetch([order[s * bs : (s + 1) * bs] for s in range(loop.steps)])
    loss_sum = torch.zeros((), device=loop.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=loop.device) if loop.cuda else None
    for step in range(loop.steps):
        kill_point("train.step")
        x, y = _get_batch(loop, order[step * bs : (step + 1) * bs])
        with loop.amp:
            out = loop.net(x)
        loss = loop.loss_fn(out.float(), y, loop.model.age_mean, loop.model.age_std)
        first_bad = _check_finite(loop, loss, first_bad, epoch, step)
        _optimizer_step(loop, loss)
        loop.global_step += 1
        loss_sum += loss.detach()
        bar.update(1)
    return loss_sum


def _get_batch(loop: _Loop, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (augmented, normalised, in the model's memory format) and ages of ``idx``."""
    x = loop.images.take(idx).float().div_(255.0)
    if loop.aug is not None:
        x = augment_batch(x, loop.aug, loop.aug_gen)
    x = (x - loop.mean_px) / loop.std_px
    if loop.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, loop.ages[idx.to(loop.device)]


def _check_finite(
    loop: _Loop, loss: torch.Tensor, first_bad: torch.Tensor | None, epoch: int, step: int
) -> torch.Tensor | None:
    """Raise :class:`TrainingDiverged` at a non-finite loss. On CUDA the first bad step is
    recorded on the device and read only every ``NONFINITE_CHECK_EVERY`` steps (each read is a
    sync); on CPU every step is checked (CPU ops are synchronous anyway)."""
    if loop.cuda:
        bad = ~torch.isfinite(loss)
        first_bad = torch.where(bad & (first_bad < 0), loop.global_step, first_bad)
        if (step + 1) % NONFINITE_CHECK_EVERY == 0 or step + 1 == loop.steps:
            _raise_if_bad(int(first_bad), epoch, loop.steps, loop.cfg.lr, loop.warmup, loop.total)
    elif not torch.isfinite(loss):
        raise TrainingDiverged(epoch, step + 1, loop.sched.get_last_lr()[0], f"loss {loss.item()}")
    return first_bad


def _optimizer_step(loop: _Loop, loss: torch.Tensor) -> None:
    loop.opt.zero_grad(set_to_none=True)
    loss.backward()
    if loop.cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(loop.params, loop.cfg.grad_clip, foreach=True)
    loop.opt.step()
    loop.sched.step()


def _raise_if_bad(
    first_bad: int, epoch: int, steps: int, base_lr: float, warmup: int, total: int
) -> None:
    if first_bad >= 0:
        raise TrainingDiverged(
            epoch, first_bad % steps + 1, base_lr * _lr_factor(first_bad, warmup, total)
        )


@torch.inference_mode()
def _calib_mae(loop: _Loop) -> torch.Tensor:
    """MAE in years over the calib split, accumulated on the device (no sync)."""
    loop.model.eval()
    ids = loop.images.index_device(loop.calib_ids)
    ages = loop.ages
    total = torch.zeros((), device=ages.device)
    batch_size = loop.cfg.eval_batch_size
    loop.images.prefetch([ids[s : s + batch_size] for s in range(0, len(ids), batch_size)])
    for start in range(0, len(ids), batch_size):
        idx = ids[start : start + batch_size]
        x = _normalise(loop.images.take(idx), loop.mean_px, loop.std_px)
        if loop.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with loop.amp:
            out = loop.net(x)
        total += (loop.model.to_age(out.float()) - ages[idx.to(ages.device)]).abs().sum()
    loop.model.train()
    return total / max(1, len(ids))


# ---------------------------------------------------------------------------------- predict


@torch.inference_mode()
def predict(
    model: AgeRegressor,
    images_uint8: torch.Tensor | np.ndarray | ShardedImages,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    amp: bool | str = True,
) -> np.ndarray:
    """Ages in years (float32 [N]) for uint8 images [N, 3, H, W].

    ``device``: where to run (the model is moved there); default the model's device. ``amp``
    (as ``train.amp``): the backbone under bf16 autocast on CUDA (``"bf16"``: on the CPU
    too); the head and the ages are fp32 either way, and without autocast the convolutions
    are IEEE fp32 (no TF32). The model's train/eval mode is restored.
    :class:`~agelab.data.shards.ShardedImages` (a dataset bigger than memory) stream: read a
    few batches ahead on a thread, never all at once.
    """
    sharded = isinstance(images_uint8, ShardedImages)
    images = images_uint8 if sharded else torch.as_tensor(images_uint8)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be uint8 [N,3,H,W], got {images.dtype} {tuple(images.shape)}"
        )
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    mean_px, std_px = imagenet_stats(dev)
    was_training = model.training
    model.eval()
    outs = []
    streamed = _Images(images, dev) if sharded else None
    if streamed is not None:
        streamed.prefetch(list(torch.arange(len(images)).split(batch_size)))
    bf16 = uses_bf16(dev, amp)
    try:
        with exact_fp32(dev, enabled=not bf16):
            for start in range(0, len(images), batch_size):
                x = _slice(images, streamed, start, batch_size).to(dev, non_blocking=True)
                x = _normalise(x, mean_px, std_px)
                if dev.type == "cuda" or bf16:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(dev, amp):  # the backbone; the head and to_age are fp32
                    out = model(x)
                outs.append(model.to_age(out.float()))
    finally:
        model.train(was_training)
        if streamed is not None:
            streamed.close()
    if not outs:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(outs).float().cpu().numpy()


def _slice(images: Any, streamed: _Images | None, start: int, size: int) -> torch.Tensor:
    """Images ``start:start + size``: a slice, or the streamed batch prefetched for it."""
    if streamed is None:
        return images[start : start + size]
    return streamed.take(torch.arange(start, min(start + size, len(images))))


# ------------------------------------------------------------------------------ checkpoints


def _plain(obj: Any) -> Any:
    """Config/census → plain python (what ``torch.load(weights_only=True)`` accepts)."""
    if hasattr(obj, "model_dump"):
        return _plain(obj.model_dump(mode="json"))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return str(obj)
    return str(obj)


def save_checkpoint(
    path: str | Path, model: AgeRegressor, config_dict: Any = None, census: Any = None
) -> Path:
    """Write state dict + build spec + loss + config + census (plain types) to ``path``
    atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": _plain(model.spec),
        "loss": _plain(model.loss.spec()),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": _plain(config_dict or {}),
        "census": _plain(census or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:  # a Python file: a full disk is an OSError with its errno,
        torch.save(payload, fh)  # not torch's "unexpected pos" RuntimeError
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[AgeRegressor, dict[str, Any]]:
    """Rebuild the model of a checkpoint and load its weights (``weights_only=True``).

    Returns ``(model, meta)`` with meta = ``{"model", "loss", "config", "census"}``. A missing,
    corrupt or mismatched file raises :class:`CheckpointError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch file "
            f"({type(exc).__name__}: {first[:200]})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an agelab checkpoint (no '{CHECKPOINT_FORMAT}' marker)"
        )
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {payload.get('version')}; this "
            f"agelab reads version {CHECKPOINT_VERSION}"
        )
    missing = [k for k in ("model", "loss", "state_dict") if not isinstance(payload.get(k), dict)]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    spec = payload["model"]
    try:
        model, _ = rebuild_model(spec)
        model.loss = make_loss(**payload["loss"])
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not match its model {spec}: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    meta = {k: payload.get(k) for k in ("model", "loss", "config", "census")}
    return model, meta

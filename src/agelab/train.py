"""Trainer: ``fit`` a model on a :class:`~agelab.data.dataset.FaceDataset`, ``predict`` ages,
save/load checkpoints.

Design points (details in ``docs/models.md``):

* The whole uint8 image tensor goes to the device once (when it fits in half the free GPU
  memory; otherwise batches are gathered on the host, pinned and copied ``non_blocking``).
  Batches are indexed on the device; augmentation is batched tensor work on the device (one
  ``affine_grid`` + ``grid_sample`` per batch for flip/scale/shift/rotate, then
  brightness/contrast) — no per-image Python, no PIL.
* CUDA: bf16 autocast, channels_last, optional ``torch.compile``, cudnn.benchmark. AdamW is
  the fused implementation on CUDA and CPU (on CPU ~4× faster per step than the default).
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

from agelab.errors import CheckpointError, TrainingDiverged
from agelab.faults import kill_point
from agelab.losses import AgeLoss, make_loss
from agelab.models import AgeRegressor, rebuild_model

__all__ = [
    "Callback",
    "CheckpointError",
    "FitResult",
    "TrainingDiverged",
    "augment_batch",
    "fit",
    "load_checkpoint",
    "predict",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NONFINITE_CHECK_EVERY = 32  # CUDA: steps between reads of the non-finite flag (one sync each)
RESIDENT_FRACTION = 0.5  # CUDA: keep images on the GPU when they need < this share of free memory
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


# ------------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available (use device=auto or cpu)")
    return torch.device(name)


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] (or float in [0, 1]) → ImageNet-normalised float32."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    return (x - mean) / std


def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
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


def _fused_ok(device: torch.device) -> bool | None:
    """Fused AdamW exists for CUDA and CPU tensors; elsewhere let torch choose."""
    return True if device.type in ("cuda", "cpu") else None


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to 0 at ``total`` (step is 0-based:
    the factor for the update about to be made)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _Images:
    """The dataset images on the device (resident) or on the host (pinned batch copies)."""

    def __init__(self, images: torch.Tensor, device: torch.device):
        self.device = device
        self.resident = True
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if images.numel() < RESIDENT_FRACTION * free:
                images = images.to(device, non_blocking=True)
            else:
                self.resident = False
        self.images = images.contiguous()

    def index_device(self, ids: torch.Tensor) -> torch.Tensor:
        """Where batch indices should live (the device if resident, else the host)."""
        return ids.to(self.device if self.resident else torch.device("cpu"))

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        if self.resident:
            return self.images[idx]
        batch = self.images.index_select(0, idx)
        return batch.pin_memory().to(self.device, non_blocking=True)


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
        return _fit(model, data, cfg, callbacks, loss_name or cfg.loss)
    finally:
        if cfg.threads:
            torch.set_num_threads(previous_threads)


def _fit(
    model: AgeRegressor, data: Any, cfg: Any, callbacks: Iterable[Callback], loss_name: str
) -> FitResult:
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    seed_everything(cfg.seed)

    train_idx, calib_idx = data.indices("train"), data.indices("calib")
    if len(train_idx) < 2:
        raise ValueError(f"the train split has {len(train_idx)} image(s); need at least 2")
    if len(calib_idx) == 0:
        raise ValueError("the calib split is empty: early stopping and model selection need it")
    ages_np = np.asarray(data.ages, dtype=np.float32)
    train_ages = ages_np[train_idx].astype(np.float64)
    std = float(train_ages.std())
    model.set_target_stats(float(train_ages.mean()), std if std > 1e-6 else 1.0)
    loss_fn = _resolve_loss(model, loss_name, cfg)
    model.loss = loss_fn

    model.to(device)
    channels_last = cuda and cfg.channels_last
    if cuda:
        torch.backends.cudnn.benchmark = True
        if channels_last:
            model.to(memory_format=torch.channels_last)
    images = _Images(data.images, device)
    ages = torch.from_numpy(ages_np).to(device)
    train_ids = images.index_device(torch.from_numpy(train_idx))
    calib_ids = torch.from_numpy(calib_idx)
    mean_px, std_px = _stats(device)
    net = torch.compile(model) if cfg.compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.amp)

    opt = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=_fused_ok(device)
    )
    n_train, bs = len(train_idx), cfg.batch_size
    # drop_last: a trailing batch of one image breaks BatchNorm (and skews the loss mean).
    steps = max(1, n_train // bs) if n_train >= bs else 1
    bs = min(bs, n_train)
    total, warmup = steps * cfg.epochs, round(cfg.warmup_epochs * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, total))
    params = [p for p in model.parameters() if p.requires_grad]
    aug = cfg.augment if cfg.augment.enabled else None

    order_gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    from tqdm.auto import tqdm

    result = FitResult(device=str(device))
    best_state: dict[str, torch.Tensor] | None = None
    since_best, global_step = 0, 0
    train_seconds, train_images = 0.0, 0

    for epoch in range(1, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        order = train_ids[torch.randperm(n_train, generator=order_gen).to(train_ids.device)]
        loss_sum = torch.zeros((), device=device)
        first_bad = torch.full((), -1, dtype=torch.long, device=device) if cuda else None
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch}/{cfg.epochs}",
            unit="batch",
            disable=not cfg.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for step in range(steps):
            kill_point("train.step")
            idx = order[step * bs : (step + 1) * bs]
            x = images.take(idx).float().div_(255.0)
            if aug is not None:
                x = augment_batch(x, aug, aug_gen)
            x = (x - mean_px) / std_px
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = ages[idx.to(device)]
            with amp:
                out = net(x)
            loss = loss_fn(out.float(), y, model.age_mean, model.age_std)
            if cuda:
                # Record the first bad step on the device; read it only every N steps.
                bad = ~torch.isfinite(loss)
                first_bad = torch.where(bad & (first_bad < 0), global_step, first_bad)
                if (step + 1) % NONFINITE_CHECK_EVERY == 0 or step + 1 == steps:
                    _raise_if_bad(int(first_bad), epoch, steps, cfg.lr, warmup, total)
            elif not torch.isfinite(loss):
                raise TrainingDiverged(
                    epoch, step + 1, sched.get_last_lr()[0], f"loss {loss.item()}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
            opt.step()
            sched.step()
            global_step += 1
            loss_sum += loss.detach()
            bar.update(1)
        if cuda:
            torch.cuda.synchronize(device)  # honest timing; the epoch-end read syncs anyway
        seconds_train = time.perf_counter() - t_epoch
        calib_mae_t = _calib_mae(
            net,
            model,
            images,
            calib_ids,
            ages,
            cfg.eval_batch_size,
            mean_px,
            std_px,
            amp,
            channels_last,
        )
        train_loss, calib_mae = torch.stack([loss_sum / steps, calib_mae_t]).tolist()
        bar.set_postfix(loss=f"{train_loss:.4f}", calib_mae=f"{calib_mae:.3f}")
        bar.close()
        if not math.isfinite(calib_mae) or not math.isfinite(train_loss):
            raise TrainingDiverged(
                epoch,
                steps,
                sched.get_last_lr()[0],
                f"non-finite epoch metrics (train loss {train_loss}, calib MAE {calib_mae})",
            )

        train_seconds += seconds_train
        train_images += steps * bs
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "calib_mae": calib_mae,
            "lr": sched.get_last_lr()[0],
            "epoch_seconds": time.perf_counter() - t_epoch,
            "images_per_second": steps * bs / max(seconds_train, 1e-9),
        }
        result.history.append(metrics)
        if calib_mae < result.best_calib_mae:
            result.best_calib_mae, result.best_epoch, since_best = calib_mae, epoch, 0
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


def _raise_if_bad(
    first_bad: int, epoch: int, steps: int, base_lr: float, warmup: int, total: int
) -> None:
    if first_bad >= 0:
        raise TrainingDiverged(
            epoch, first_bad % steps + 1, base_lr * _lr_factor(first_bad, warmup, total)
        )


@torch.inference_mode()
def _calib_mae(
    net: nn.Module,
    model: AgeRegressor,
    images: _Images,
    ids: torch.Tensor,
    ages: torch.Tensor,
    batch_size: int,
    mean_px: torch.Tensor,
    std_px: torch.Tensor,
    amp: torch.autocast,
    channels_last: bool,
) -> torch.Tensor:
    """MAE in years over ``ids``, accumulated on the device (no sync)."""
    model.eval()
    ids = images.index_device(ids)
    total = torch.zeros((), device=ages.device)
    for start in range(0, len(ids), batch_size):
        idx = ids[start : start + batch_size]
        x = _normalise(images.take(idx), mean_px, std_px)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            out = net(x)
        total += (model.to_age(out.float()) - ages[idx.to(ages.device)]).abs().sum()
    model.train()
    return total / max(1, len(ids))


# ---------------------------------------------------------------------------------- predict


@torch.inference_mode()
def predict(
    model: AgeRegressor,
    images_uint8: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    amp: bool = True,
) -> np.ndarray:
    """Ages in years (float32 [N]) for uint8 images [N, 3, H, W].

    ``device``: where to run (the model is moved there); default the model's device. ``amp``:
    bf16 autocast on CUDA (ignored on CPU). The model's train/eval mode is restored.
    """
    images = torch.as_tensor(images_uint8)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be uint8 [N,3,H,W], got {images.dtype} {tuple(images.shape)}"
        )
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    mean_px, std_px = _stats(dev)
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and amp):
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].to(dev, non_blocking=True)
                x = _normalise(x, mean_px, std_px)
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                outs.append(model.to_age(model(x).float()))
    finally:
        model.train(was_training)
    if not outs:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(outs).float().cpu().numpy()


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
    torch.save(payload, tmp)
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

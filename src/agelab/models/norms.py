"""Normalisation choices (``model.norm``): the registry and the modules that place a norm.

Each :data:`NORMS` entry holds what agelab knows about one kind: how to build it for NCHW
input, whether it adapts its statistics from data (the other kinds get the no-norm
initialisation, see :mod:`agelab.models.weights`) and which module classes count as that
kind (for the swap and the census). Adding a norm is one entry; :func:`get_norm` fails on an
unknown name with the list of valid ones. The wrappers below adapt an NCHW norm to timm's
calling conventions and to channels-last / token layouts, so entries stay layout-free.

agelab's :class:`GroupNorm` and :class:`InstanceNorm2d` are torch's, with two guarantees
every norm kind then shares (BatchNorm, LayerNorm2d and the rest have them already): the
output keeps the input's memory format (torch's CUDA group norm and its instance norm return
NCHW for channels_last input: two layout copies per norm in a channels_last network), and
the statistics are computed in fp32 under bf16 autocast, the output handed on in the input's
dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from agelab.errors import ModelError

__all__ = [
    "NORMS",
    "GroupNorm",
    "InstanceNorm2d",
    "InstanceNormSkipped",
    "LastDimNorm",
    "NoNorm",
    "Norm",
    "NormAct",
    "get_norm",
    "group_count",
    "norm_channels",
    "norm_kind",
    "norm_layout",
]


def group_count(channels: int, groups: int) -> int:
    """Largest divisor of ``channels`` that is ≤ ``groups`` (GroupNorm needs C % G == 0)."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


class NoNorm(nn.Identity):
    """``norm: none`` — an identity with its own class so the census can count it."""


@dataclass(frozen=True)
class Norm:
    """A registry entry; ``NORMS[name](channels, groups)`` builds the module for NCHW input."""

    build: Callable[[int, int], nn.Module]
    adaptive: bool  # statistics from data; the others get the no-norm initialisation
    classes: tuple[type[nn.Module] | str, ...]  # modules of this kind: classes or class names

    def __call__(self, channels: int, groups: int) -> nn.Module:
        return self.build(channels, groups)

    def matches(self, m: nn.Module) -> bool:
        name = type(m).__name__
        return any(name == c if isinstance(c, str) else isinstance(m, c) for c in self.classes)


def _channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels_last (and not also plain contiguous, as [N, C, 1, 1])."""
    return (
        x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    )


def _fp32_params(m: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    w, b = m.weight, m.bias
    return (w.float() if w is not None else None), (b.float() if b is not None else None)


def group_norm_channels_last(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``F.group_norm`` of a channels_last ``x`` computed on its NHWC memory (views only, no
    layout copy), statistics in fp32; returns channels_last in ``x``'s dtype."""
    n, c, h, w = x.shape
    xg = x.permute(0, 2, 3, 1).reshape(n, h * w, groups, c // groups).float()  # NHWC view
    var, mean = torch.var_mean(xg, dim=(1, 3), correction=0, keepdim=True)
    scale = torch.rsqrt(var + eps)  # [n, 1, G, 1]
    if weight is not None:
        scale = scale * weight.float().view(1, 1, groups, c // groups)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float().view(1, 1, groups, c // groups)
    y = torch.addcmul(shift, xg, scale)  # x·scale + shift: one pass
    return y.reshape(n, h, w, c).permute(0, 3, 1, 2).to(x.dtype)


def _group_norm(x: torch.Tensor, groups: int, m: nn.Module) -> torch.Tensor:
    """Group norm of ``x`` with ``m``'s affine and eps: fp32 statistics, ``x``'s layout
    and dtype. torch's CPU kernel keeps channels_last itself; elsewhere channels_last input
    takes :func:`group_norm_channels_last`."""
    if _channels_last(x) and x.device.type != "cpu":
        return group_norm_channels_last(x, groups, m.weight, m.bias, m.eps)
    w, b = _fp32_params(m)
    return F.group_norm(x.float(), groups, w, b, m.eps).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps the input's memory format and computes in fp32 (see the
    module docstring). Same parameters, same state dict, same census name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _autocast_off(x):
            return _group_norm(x, self.num_groups, self)


class InstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` that keeps the input's memory format and computes in fp32 (see
    the module docstring). Without running statistics, an instance norm is a group norm with
    one channel per group: channels_last input is normalised as that, NCHW input by torch's
    instance norm as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.track_running_stats or not _channels_last(x):
            if x.dtype == torch.float32:
                return super().forward(x)
            with _autocast_off(x):
                return super().forward(x.float()).to(x.dtype)
        with _autocast_off(x):
            return _group_norm(x, self.num_features, self)


def _autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


# One entry per kind; the classes of different kinds are disjoint. frozen_batch built from
# scratch is a frozen identity affine, so it is not adaptive. Its classes are matched by name:
# torchvision's FrozenBatchNorm2d and timm's FrozenBatchNormAct2d are plain Modules.
NORMS: dict[str, Norm] = {
    "batch": Norm(lambda c, g: nn.BatchNorm2d(c), True, (nn.modules.batchnorm._BatchNorm,)),
    "group": Norm(lambda c, g: GroupNorm(group_count(c, g), c), True, (nn.GroupNorm,)),
    # per position over channels (a channels-last LayerNorm); also matches token LayerNorms
    "layer": Norm(lambda c, g: LayerNorm2d(c), True, (nn.LayerNorm,)),
    "instance": Norm(
        lambda c, g: InstanceNorm2d(c, affine=True),
        True,
        (nn.modules.instancenorm._InstanceNorm,),
    ),
    "frozen_batch": Norm(
        lambda c, g: FrozenBatchNorm2d(c), False, ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")
    ),
    "none": Norm(lambda c, g: NoNorm(), False, (NoNorm,)),
}


def get_norm(name: str) -> Norm:
    """The registry entry ``name``; an unknown name raises :class:`ModelError` listing all."""
    if name not in NORMS:
        raise ModelError(f"unknown norm {name!r}; valid choices: {', '.join(NORMS)}")
    return NORMS[name]


def norm_kind(m: nn.Module) -> str | None:
    """Registry kind of a normalisation module (``None`` if it is not a known norm)."""
    return next((name for name, norm in NORMS.items() if norm.matches(m)), None)


def norm_layout(m: nn.Module) -> str | None:
    """``nchw`` or ``last`` (normalises the last dim), or None when agelab cannot place it."""
    name = type(m).__name__
    if isinstance(m, nn.LayerNorm):
        if "2d" in name:  # timm LayerNorm2d / LayerNormAct2d: NCHW, over channels
            return "nchw"
        return "last" if len(m.normalized_shape) == 1 else None
    if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm, NoNorm)):
        return "nchw"
    if name in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"):
        return "nchw"
    return None


def norm_channels(m: nn.Module) -> int:
    """The channel count a norm module was built for."""
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(m, attr, None), int):
            return getattr(m, attr)
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    return int(m.weight.shape[0])


class LastDimNorm(nn.Module):
    """Apply an NCHW norm to a channels-last tensor ``[B, *positions, C]`` (ViT tokens,
    ConvNeXt's NHWC blocks, pooled ``[B, C]`` vectors).

    Tokens/positions play the role of spatial positions, so every norm keeps the meaning it has
    in a conv net: batch = per channel over batch and positions, group = per sample over a
    group of channels and all positions, layer = per position over channels (exactly the usual
    token LayerNorm), instance = per sample and channel over positions.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = x.reshape(shape[0], -1, shape[-1]).transpose(1, 2).unsqueeze(-1)  # [B, C, P, 1]
        y = self.norm(y)
        return y.squeeze(-1).transpose(1, 2).reshape(shape)


class NormAct(nn.Module):
    """Norm → (drop) → activation: agelab's stand-in for timm's ``BatchNormAct2d`` family, so
    any norm kind can sit where timm expects a fused norm+act layer."""

    def __init__(
        self, norm: nn.Module, act: nn.Module | None = None, drop: nn.Module | None = None
    ):
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


class InstanceNormSkipped(nn.Identity):
    """Where an instance norm would see a single spatial position (e.g. a pooled 1×1 map or
    ResNet's last stage on 32 px input) its output would be the constant β whatever the input;
    such norms are built as identities and listed in the census notes."""

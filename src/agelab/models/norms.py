"""Normalisation choices (``model.norm``): the registry and the modules that place a norm.

Each :data:`NORMS` entry holds what agelab knows about one kind: how to build it for NCHW
input, whether it adapts its statistics from data (the other kinds get the no-norm
initialisation, see :mod:`agelab.models.weights`) and which module classes count as that
kind (for the swap and the census). Adding a norm is one entry; :func:`get_norm` fails on an
unknown name with the list of valid ones. The wrappers below adapt an NCHW norm to timm's
calling conventions and to channels-last / token layouts, so entries stay layout-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from agelab.errors import ModelError

__all__ = [
    "NORMS",
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


# One entry per kind; the classes of different kinds are disjoint. frozen_batch built from
# scratch is a frozen identity affine, so it is not adaptive. Its classes are matched by name:
# torchvision's FrozenBatchNorm2d and timm's FrozenBatchNormAct2d are plain Modules.
NORMS: dict[str, Norm] = {
    "batch": Norm(lambda c, g: nn.BatchNorm2d(c), True, (nn.modules.batchnorm._BatchNorm,)),
    "group": Norm(lambda c, g: nn.GroupNorm(group_count(c, g), c), True, (nn.GroupNorm,)),
    # per position over channels (a channels-last LayerNorm); also matches token LayerNorms
    "layer": Norm(lambda c, g: LayerNorm2d(c), True, (nn.LayerNorm,)),
    "instance": Norm(
        lambda c, g: nn.InstanceNorm2d(c, affine=True),
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

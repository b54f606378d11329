"""The module swap: after timm has built a network, replace every norm and trunk activation
that the constructor keywords did not reach (MobileNetV3's per-block ``ReLU`` overrides, the
ReLU forced inside its squeeze-excite, any model of a family without an entry)."""

from __future__ import annotations

import re

from torch import nn

from agelab.errors import ModelError
from agelab.models.acts import ACTS, TRUNK_ACT_CLASSES
from agelab.models.backbones import SUPPORTED_BACKBONES
from agelab.models.norms import (
    NORMS,
    InstanceNormSkipped,
    LastDimNorm,
    NoNorm,
    NormAct,
    group_count,
    norm_channels,
    norm_kind,
    norm_layout,
)

__all__ = ["replace_module", "swap_acts", "swap_norms"]

# A class name that looks like a norm but is no registry kind makes the swap fail: an unknown
# norm left in place would silently contradict the census.
_NORM_LIKE = re.compile(r"(Batch|Group|Layer|Instance|Rms|Evo|FilterResponse|Simple)Norm")


def replace_module(root: nn.Module, qname: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``qname`` of ``root`` is."""
    parent_name, _, attr = qname.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def _is_wanted(m: nn.Module, kind: str, groups: int) -> bool:
    """Already the requested kind (a GroupNorm also with the requested group count)."""
    if norm_kind(m) != kind:
        return False
    return not (kind == "group" and m.num_groups != group_count(m.num_channels, groups))


def _replacement(m: nn.Module, kind: str, groups: int, layout: str) -> nn.Module:
    """A ``kind`` norm for the place of ``m``, in its layout, keeping a timm NormAct's act."""
    new = NORMS[kind](norm_channels(m), groups)
    if layout == "last":
        new = LastDimNorm(new) if kind != "layer" else nn.LayerNorm(norm_channels(m))
    act = getattr(m, "act", None)
    if isinstance(act, nn.Module):  # a timm NormAct layer: keep its act (swapped later)
        drop = getattr(m, "drop", None)
        new = NormAct(new, act, drop if isinstance(drop, nn.Module) else None)
    return new


def swap_norms(root: nn.Module, kind: str, groups: int) -> int:
    """Replace every norm of another kind (or GroupNorm of another group count). Returns the
    number replaced; raises ModelError for norm-like modules agelab cannot place."""
    own_modules = (LastDimNorm, NormAct, InstanceNormSkipped, NoNorm)
    swapped, unknown = 0, []
    replaced: list[str] = []
    for qname, m in list(root.named_modules()):
        if any(qname.startswith(p + ".") for p in replaced):
            continue  # inside a module already replaced
        if norm_kind(m) is None:
            if _NORM_LIKE.search(type(m).__name__) and not isinstance(m, own_modules):
                unknown.append(f"{qname} ({type(m).__name__})")
            continue
        if _is_wanted(m, kind, groups):
            continue
        layout = norm_layout(m)
        if layout is None:
            unknown.append(f"{qname} ({type(m).__name__}, unsupported layout)")
            continue
        replace_module(root, qname, _replacement(m, kind, groups, layout))
        replaced.append(qname)
        swapped += 1
    if unknown:
        raise ModelError(
            f"cannot swap {len(unknown)} normalisation layer(s) of unknown kind: "
            f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}; "
            f"use one of the supported backbones: {', '.join(SUPPORTED_BACKBONES)}"
        )
    return swapped


def swap_acts(root: nn.Module, act: str) -> int:
    """Replace every trunk activation of another class; returns the number replaced."""
    target = ACTS[act].layer
    swapped = 0
    for qname, m in list(root.named_modules()):
        if isinstance(m, TRUNK_ACT_CLASSES) and type(m) is not target:
            replace_module(root, qname, ACTS[act]())
            swapped += 1
    return swapped

"""A backbone's starting weights: agelab's residual initialisation when it is built from
scratch, or a local pretrained file (nothing is ever downloaded).

From scratch, with an adaptive norm the last norm of each residual branch starts at zero (for
the families where timm does it, whatever the norm kind). Without one (``none``, a
``frozen_batch`` identity), a deep network would not train from step one: every conv/linear
gets a Kaiming fan-in init with the gain of the requested activation (unit variance without
norms) and each residual branch ends in a :class:`SkipInit` gain α = 0, so every block starts
as the identity (De & Smith 2020). ConvNeXt keeps its LayerScale (γ = 1e-6) and ViT gets
LayerScale (``init_values``), the transformer analogue.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from agelab.errors import ModelError
from agelab.models.acts import ACTS
from agelab.models.backbones import Family
from agelab.models.norms import NORMS, NormAct
from agelab.models.swap import replace_module

__all__ = ["SkipInit", "init_residual", "load_weights", "starting_weights"]

# In these timm blocks the named attribute is the last norm of the residual branch (the one
# timm's ``zero_init_last`` zeroes); see _residual_branch_ends.
_RESIDUAL_BRANCH_END: dict[str, str] = {
    "timm.models.resnet.BasicBlock": "bn2",
    "timm.models.resnet.Bottleneck": "bn3",
    "timm.models.regnet.Bottleneck": "conv3.bn",
    "timm.models._efficientnet_blocks.InvertedResidual": "bn3",
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv": "bn2",
    "timm.models._efficientnet_blocks.EdgeResidual": "bn2",
}


class SkipInit(nn.Module):
    """``inner(x) · α`` with a learnable scalar α initialised to 0 (De & Smith 2020).

    Placed at the end of each residual branch when the network has no adaptive norm: every
    block starts as the identity, so a deep un-normalised net trains from step one."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.gain


def starting_weights(
    backbone: nn.Module,
    timm_name: str,
    family: Family,
    norm: str,
    act: str,
    *,
    pretrained: bool,
    weights: Path | None,
    notes: list[str],
) -> dict[str, Any]:
    """Initialise ``backbone`` from scratch or load ``weights``; returns the init census.

    Pretrained weights are used as they are: no residual re-initialisation, no SkipInit
    modules (``weights=None`` with ``pretrained``: rebuilding that structure for a
    checkpoint)."""
    if not pretrained:
        return init_residual(backbone, family, norm, act)
    init: dict[str, Any] = {"scheme": "pretrained"}
    if weights is not None:
        init.update(load_weights(backbone, timm_name, weights))
    if not NORMS[norm].adaptive:
        notes.append("pretrained: no-norm initialisation not applied")
    return init


def _residual_branch_ends(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, norm module) at the end of each residual branch of known timm blocks
    that really have a skip connection."""
    ends = []
    for qname, block in backbone.named_modules():
        attr = _RESIDUAL_BRANCH_END.get(f"{type(block).__module__}.{type(block).__qualname__}")
        if attr is None:
            continue
        if getattr(block, "has_skip", True) is False:
            continue  # efficientnet-style block without a shortcut: nothing to keep as identity
        if type(block).__module__.endswith("regnet") and block.downsample is None:
            continue
        path = f"{qname}.{attr}" if qname else attr
        module = backbone.get_submodule(path)
        if isinstance(module, NormAct):
            path, module = f"{path}.norm", module.norm
        ends.append((path, module))
    return ends


def init_residual(backbone: nn.Module, family: Family, norm: str, act: str) -> dict[str, Any]:
    """agelab's residual initialisation from scratch (see the module docstring); returns
    what it did."""
    ends = _residual_branch_ends(backbone)
    if NORMS[norm].adaptive:
        zeroed = 0
        if family.zero_init_last:
            for _, m in ends:
                w = getattr(m, "weight", None)
                if isinstance(w, nn.Parameter):
                    nn.init.zeros_(w)
                    zeroed += 1
        return {"scheme": "zero_init_last" if zeroed else "timm default", "zeroed_norms": zeroed}

    rescaled = _fan_in_init(backbone, ACTS[act].gain) if family.fan_in_init else 0
    for path, m in ends:
        replace_module(backbone, path, SkipInit(m))
    info: dict[str, Any] = {
        "scheme": "no-norm",
        "fan_in_rescaled": rescaled,
        "skipinit_gains": len(ends),
    }
    layer_scales = sum(type(m).__name__ == "LayerScale" for m in backbone.modules())
    if family.layer_scale or layer_scales:
        info["layer_scale"] = layer_scales or family.layer_scale
    if not ends and not layer_scales and not family.layer_scale:
        info["warning"] = (
            "no residual blocks known for this architecture: only the fan-in init is applied"
        )
    return info


def _fan_in_init(backbone: nn.Module, gain: float) -> int:
    """Kaiming fan-in init (std = gain / √fan_in) of every conv/linear; returns how many."""
    rescaled = 0
    for m in backbone.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, std=gain / math.sqrt(fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            rescaled += 1
    return rescaled


# ---------------------------------------------------------------------------- pretrained


def _read_state(path: Path) -> dict[str, Any]:
    """The state dict in a ``.safetensors`` or torch file (unwrapped, ``module.`` stripped)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _drop_foreign_keys(state: dict[str, Any], own: dict[str, Any], timm_name: str) -> int:
    """Remove the ImageNet classifier (agelab has its own head) and BN bookkeeping that
    FrozenBatchNorm2d does not keep; returns how many classifier keys were dropped."""
    classifier = timm.models.get_pretrained_cfg(timm_name)
    head = getattr(classifier, "classifier", None) or "fc"
    heads = head if isinstance(head, (list, tuple)) else [head]
    dropped = [k for k in state if k not in own and any(k.startswith(h + ".") for h in heads)]
    for k in dropped:
        del state[k]
    for k in [k for k in state if k not in own and k.endswith("num_batches_tracked")]:
        del state[k]
    return len(dropped)


def _mismatch(state: dict[str, Any], own: dict[str, Any]) -> list[str]:
    """``missing: a, b (2)``-style parts for the keys that do not fit."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatch", shape),
    ):
        if keys:
            parts.append(
                f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''} ({len(keys)})"
            )
    return parts


def load_weights(backbone: nn.Module, timm_name: str, weights: Path) -> dict[str, Any]:
    """Load a local weights file into ``backbone`` (strict, once the classifier is dropped)."""
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"pretrained weights file {path} does not exist")
    state = _read_state(path)
    own = backbone.state_dict()
    dropped = _drop_foreign_keys(state, own, timm_name)
    parts = _mismatch(state, own)
    if parts:
        raise ModelError(
            f"weights file {path} does not fit backbone {timm_name} as built (norm/act swaps "
            f"change parameter names, img_size changes position embeddings): {'; '.join(parts)}"
        )
    backbone.load_state_dict(state, strict=True)
    return {"file": str(path), "tensors": len(state), "dropped_classifier_keys": dropped}

"""Backbones: timm names, and how each architecture family takes a norm and an activation.

:data:`FAMILIES` holds what agelab knows about one timm family (the module defining the
architecture): the calling convention of its ``norm_layer=`` keyword, other constructor
keywords, whether timm zero-initialises its residual branches, and the notes that explain the
build. Keyword conventions are verified for timm 1.0.x; any other timm model is built with its
defaults and the module swap (:mod:`agelab.models.swap`) does all the work.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
from torch import nn

from agelab.errors import ModelError
from agelab.models.acts import ACTS
from agelab.models.norms import NORMS, LastDimNorm, NormAct

__all__ = [
    "FAMILIES",
    "SUPPORTED_BACKBONES",
    "Family",
    "constructor_kwargs",
    "create_backbone",
    "family_of",
    "family_spec",
    "resolve_backbone",
]

SUPPORTED_BACKBONES = (
    "resnet10t",
    "resnet18",
    "mobilenetv3_small_100",
    "efficientnet_b0",
    "convnext_atto",
    "regnetx_002",
    "vit_tiny_patch16",
)
ALIASES = {"vit_tiny_patch16": "vit_tiny_patch16_224"}

# ViT with a non-adaptive norm: LayerScale (timm ``init_values``) on both residual branches,
# the transformer form of SkipInit.
VIT_NO_NORM_LAYER_SCALE = 1e-4


def resolve_backbone(name: str) -> str:
    """The timm model name for ``name`` (aliases: ``vit_tiny_patch16`` → ``…_224``).

    Unknown names raise ``ValueError`` listing close matches from ``timm.list_models``."""
    resolved = ALIASES.get(name, name)
    if timm.is_model(resolved):
        return resolved
    if timm.is_model(f"{name}_224"):  # the same convenience for other *_224 ViT-style names
        return f"{name}_224"
    close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ValueError(
        f"unknown backbone {name!r}{hint} (supported and tested: {', '.join(SUPPORTED_BACKBONES)};"
        " any timm model name is accepted)"
    )


def family_of(timm_name: str) -> str:
    """timm module defining the architecture (resnet, efficientnet, vision_transformer, …)."""
    return timm.models.model_entrypoint(timm_name).__module__.rsplit(".", 1)[-1]


# ---------------------------------------------------------------- timm calling conventions


def _act_layer(act: str, inplace: bool | None = None, **_ignored: Any) -> nn.Module:
    # timm passes ``inplace`` and sometimes keywords meant for its default activation; the
    # requested activation keeps its own defaults and is built out of place (see acts.py).
    return ACTS[act]()


def _norm_plain(c: int, *, kind: str, groups: int, **_ignored: Any) -> nn.Module:
    # ``_ignored``: device/dtype (built on CPU) and eps (every norm uses PyTorch's default eps).
    return NORMS[kind](c, groups)


def _norm_tokens(c: int, *, kind: str, groups: int, **_ignored: Any) -> nn.Module:
    if kind == "layer":  # identical maths to LastDimNorm(LayerNorm2d), without the transposes
        return nn.LayerNorm(c)
    return LastDimNorm(NORMS[kind](c, groups))


def _norm_act(
    c: int,
    *,
    kind: str,
    groups: int,
    act: str,
    apply_act: bool = True,
    drop_layer: Callable[[], nn.Module] | None = None,
    **_ignored: Any,
) -> nn.Module:
    # timm's norm+act convention (EfficientNet, MobileNetV3, RegNet's ConvNormAct): the layer
    # also applies the block's activation unless ``apply_act=False``.
    return NormAct(
        NORMS[kind](c, groups),
        ACTS[act]() if apply_act else None,
        drop_layer() if drop_layer is not None else None,
    )


# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """What agelab knows about one timm architecture family."""

    norm_layer: Callable[..., nn.Module] | None = None  # convention; None: swapped afterwards
    keywords: dict[str, Any] = field(default_factory=dict)  # other constructor keywords
    notes: tuple[str, ...] = ()
    # timm zero-initialises the last norm of each residual branch (BN weights only); agelab
    # turns that off and does it itself for every adaptive norm kind (weights.init_residual).
    zero_init_last: bool = False
    takes_img_size: bool = False  # transformers need the image size; CNNs reject it
    no_norm_keywords: dict[str, Any] = field(default_factory=dict)  # non-adaptive, from scratch
    fan_in_init: bool = True  # no-norm init re-draws conv/linear weights (ViT: LayerScale only)
    layer_scale: str | None = None  # a residual scale the family always has (init census)


FAMILIES: dict[str, Family] = {
    "resnet": Family(_norm_plain, zero_init_last=True),
    "convnext": Family(
        _norm_plain,
        # timm insists on conv_mlp=True for a custom norm_layer so every norm sees NCHW; the
        # 1×1-conv MLP is mathematically the same as the Linear MLP it replaces.
        keywords={"conv_mlp": True},
        notes=(
            "convnext built with conv_mlp=True (1×1-conv MLP ≡ Linear MLP) so every "
            "norm sees NCHW input",
        ),
        layer_scale="convnext gamma (1e-6)",
    ),
    "regnet": Family(_norm_act, zero_init_last=True),
    "efficientnet": Family(_norm_act),
    # MobileNetV3's generators hard-code norm_layer=BatchNorm2d (a second norm_layer keyword is
    # a TypeError): its norms are swapped after construction; act_layer is taken.
    "mobilenetv3": Family(
        None,
        notes=(
            "mobilenetv3: per-block ReLU overrides ('nre' blocks) and the ReLU timm "
            "forces inside squeeze-excite are swapped to the requested act",
        ),
    ),
    "vision_transformer": Family(
        _norm_tokens,
        notes=(
            "vit: norm applies to tokens as spatial positions (layer = standard token "
            "LayerNorm; batch/instance over tokens; group over channel groups × tokens)"
            "; attention softmax is not an activation and is kept",
        ),
        takes_img_size=True,
        no_norm_keywords={"init_values": VIT_NO_NORM_LAYER_SCALE},
        fan_in_init=False,
    ),
}


def family_spec(family: str) -> Family | None:
    """The :data:`FAMILIES` entry of ``family``; None for a family agelab has no entry for."""
    return FAMILIES.get(family)


def constructor_kwargs(
    family: str, norm: str, act: str, groups: int, img_size: int, from_scratch: bool
) -> tuple[dict[str, Any], list[str]]:
    """Keyword arguments for ``timm.create_model`` and notes explaining them."""
    spec = family_spec(family)
    if spec is None:
        note = (
            f"timm family {family!r} has no known norm/act keywords: built with its "
            "defaults, every norm and activation swapped afterwards"
        )
        return {}, [note]
    kw: dict[str, Any] = {}
    notes: list[str] = []
    # functools.partial of a plain function: timm's get_norm_layer/get_norm_act_layer unbind
    # and re-bind partials and pass plain functions through untouched.
    if spec.norm_layer is not None:
        norm_kw: dict[str, Any] = {"kind": norm, "groups": groups}
        if spec.norm_layer is _norm_act:
            norm_kw["act"] = act
        kw["norm_layer"] = functools.partial(spec.norm_layer, **norm_kw)
    else:
        notes.append(
            f"{family}: norm_layer is fixed by timm's generator; norms swapped after construction"
        )
    kw["act_layer"] = functools.partial(_act_layer, act)
    notes.extend(spec.notes)
    if spec.zero_init_last:
        kw["zero_init_last"] = False
    kw.update(spec.keywords)
    if spec.takes_img_size:
        kw["img_size"] = img_size
    if not NORMS[norm].adaptive and from_scratch:
        kw.update(spec.no_norm_keywords)
    return kw, notes


def create_backbone(
    name: str, family: str, kwargs: dict[str, Any], img_size: int, notes: list[str]
) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model(name)`` without a classifier, with ``kwargs``; returns the network
    and the keywords it was built with.

    A constructor that rejects a keyword (``TypeError``) is retried with timm's defaults and
    the swap does all the work (said in ``notes``)."""
    spec = family_spec(family)
    if spec is not None:
        attempts = [kwargs, {"img_size": img_size} if spec.takes_img_size else {}]
    else:
        attempts = [{"img_size": img_size}, {}]  # transformers need img_size; CNNs reject it
    for i, attempt in enumerate(attempts):
        try:
            net = timm.create_model(name, pretrained=False, num_classes=0, **attempt)
        except TypeError as exc:
            if i + 1 == len(attempts):
                raise ModelError(f"timm cannot build {name}: {exc}") from exc
            if kwargs and attempt is kwargs:
                notes.append(
                    f"constructor keywords rejected ({exc}); built with timm defaults and swapped"
                )
            continue
        return net, attempt
    raise AssertionError("unreachable: the last attempt returns or raises")

"""Model factory: a timm backbone built from scratch with a chosen normalisation and activation.

``build_model(backbone, norm, act, img_size=...)`` returns an :class:`AgeRegressor` (backbone →
pooled features → dropout → linear head) and a *census*: a plain dict that proves what was
built — the count of every normalisation and activation module class in the backbone, which
kinds were requested, what was changed after construction, what was left alone on purpose and
whether the forward pass applies any activation functionally (where no module swap can reach).

How a choice reaches the network (details and the per-backbone table in ``docs/models.md``):

1. timm's own ``norm_layer=`` / ``act_layer=`` keywords, for the architecture families whose
   constructors take them (ResNet, RegNet, EfficientNet, MobileNetV3, ConvNeXt, ViT), in the
   calling convention each family uses (plain norm, timm "norm+act" layer, token norm);
2. a module swap afterwards for everything the keywords did not reach (MobileNetV3's per-block
   ``ReLU`` overrides, the ReLU forced inside its squeeze-excite, any other timm model);
3. a probe forward pass that (a) counts activation ops applied *functionally* (``F.relu`` in a
   ``forward``), rejecting the backbone when they contradict the requested activation, and
   (b) finds instance norms that see a single spatial position (statistics undefined).

Sigmoid / hard-sigmoid modules are *gates* (they scale features in squeeze-excite blocks), not
trunk activations: they are kept and counted separately in the census.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import LayerNorm2d
from timm.layers import activations as timm_acts
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops.misc import FrozenBatchNorm2d

from agelab.errors import ModelError
from agelab.losses import AgeLoss, default_loss_for

__all__ = [
    "ACTS",
    "NORMS",
    "SUPPORTED_BACKBONES",
    "AgeRegressor",
    "ModelError",
    "build_model",
    "build_model_from_config",
    "functional_activation_calls",
    "rebuild_model",
    "resolve_backbone",
]


# ------------------------------------------------------------------------------ registries


def _group_count(channels: int, groups: int) -> int:
    """Largest divisor of ``channels`` that is ≤ ``groups`` (GroupNorm needs C % G == 0)."""
    return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)


class NoNorm(nn.Identity):
    """``norm: none`` — an identity with its own class so the census can count it."""


# name → factory(channels, groups) building a norm for NCHW input. One line per entry; the
# factory is adapted to each timm calling convention (and to token / channels-last layouts)
# by the wrappers below, so entries stay layout-free.
NORMS: dict[str, Callable[[int, int], nn.Module]] = {
    "batch": lambda c, groups: nn.BatchNorm2d(c),
    "group": lambda c, groups: nn.GroupNorm(_group_count(c, groups), c),
    "layer": lambda c, groups: LayerNorm2d(c),  # per position over channels (channels-last LN)
    "instance": lambda c, groups: nn.InstanceNorm2d(c, affine=True),
    "frozen_batch": lambda c, groups: FrozenBatchNorm2d(c),
    "none": lambda c, groups: NoNorm(),
}

# name → factory() building the activation module. One line per entry.
ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "mish": nn.Mish,
}

# Norms that adapt their statistics from data. The others (none, frozen_batch built from
# scratch: a frozen identity affine) get the no-normalisation initialisation.
ADAPTIVE_NORMS = ("batch", "group", "layer", "instance")

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

# Trunk activation classes a swap replaces, and gate classes it keeps (see module docstring).
TRUNK_ACT_CLASSES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Tanh, nn.PReLU, nn.RReLU, nn.Softplus,
    timm_acts.GELU, timm_acts.GELUTanh, timm_acts.QuickGELU, timm_acts.Swish, timm_acts.Mish,
    timm_acts.HardSwish, timm_acts.HardMish, timm_acts.Tanh, timm_acts.PReLU,
)  # fmt: skip
GATE_CLASSES: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.Hardsigmoid, timm_acts.Sigmoid, timm_acts.HardSigmoid,
)  # fmt: skip

# aten op names (overload packet, trailing "_" of in-place variants stripped) of activations,
# for the functional-call detector.
TRUNK_ACT_OPS = frozenset({
    "relu", "gelu", "silu", "hardswish", "elu", "leaky_relu", "mish", "tanh", "hardtanh",
    "celu", "selu", "softplus", "prelu", "_prelu_kernel", "rrelu_with_noise", "threshold",
})  # fmt: skip
GATE_OPS = frozenset({"sigmoid", "hardsigmoid"})

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
# Families where timm itself zero-initialises the last norm of each residual branch; agelab
# keeps that policy for every adaptive norm kind (timm's own version only reaches BN weights).
_ZERO_INIT_LAST_FAMILIES = ("resnet", "regnet")

# ViT with a non-adaptive norm: LayerScale (timm ``init_values``) on both residual branches,
# the transformer form of SkipInit.
VIT_NO_NORM_LAYER_SCALE = 1e-4


# -------------------------------------------------------------------------------- modules


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


class InstanceNormSkipped(nn.Identity):
    """Where an instance norm would see a single spatial position (e.g. a pooled 1×1 map or
    ResNet's last stage on 32 px input) its output would be the constant β whatever the input;
    such norms are built as identities and listed in the census notes."""


class AgeRegressor(nn.Module):
    """Backbone → pooled features → dropout → linear head.

    The head predicts *standardised* age for regression losses (the trainer stores the training
    mean/std in the ``age_mean``/``age_std`` buffers) or age-bin logits for ``dex``;
    :meth:`to_age` maps outputs back to years through the attached loss.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        out_dim: int,
        drop_rate: float,
        spec: dict[str, Any],
    ):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, out_dim)
        # A small head init: the first predictions sit at the mean age (regression) or are
        # near-uniform over bins (dex) instead of random offsets of several σ.
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("age_mean", torch.tensor(0.0))
        self.register_buffer("age_std", torch.tensor(1.0))
        self.spec = dict(spec)  # plain build arguments: enough to rebuild (checkpoints)
        self.loss: AgeLoss = default_loss_for(out_dim)

    @property
    def out_dim(self) -> int:
        return self.head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))

    def set_target_stats(self, mean: float, std: float) -> None:
        self.age_mean.fill_(float(mean))
        self.age_std.fill_(float(std))

    def to_age(self, output: torch.Tensor) -> torch.Tensor:
        return self.loss.to_age(output.float(), self.age_mean, self.age_std)


# ---------------------------------------------------------------------------- name lookup


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


def _family(timm_name: str) -> str:
    """timm module defining the architecture (resnet, efficientnet, vision_transformer, …)."""
    return timm.models.model_entrypoint(timm_name).__module__.rsplit(".", 1)[-1]


# ---------------------------------------------------------------- timm calling conventions


def _act_layer(act: str, inplace: bool | None = None, **_ignored: Any) -> nn.Module:
    # timm passes ``inplace`` and sometimes activation-specific kwargs meant for its default
    # activation; the requested activation keeps its own defaults. Activations are always
    # built out-of-place: with ``norm: none`` an in-place activation would overwrite the
    # conv output that autograd may still need, and the ablation cells stay comparable.
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


# family → how its constructor takes norm/act (keyword conventions verified for timm 1.0.x).
_FAMILY_NORM_CONVENTION = {
    "resnet": _norm_plain,
    "convnext": _norm_plain,
    "regnet": _norm_act,
    "efficientnet": _norm_act,
    # MobileNetV3's generators hard-code norm_layer=BatchNorm2d (a second norm_layer keyword is
    # a TypeError): its norms are swapped after construction; act_layer is taken.
    "mobilenetv3": None,
    "vision_transformer": _norm_tokens,
}


def _constructor_kwargs(
    family: str, norm: str, act: str, groups: int, img_size: int, from_scratch: bool
) -> tuple[dict[str, Any], list[str]]:
    """Keyword arguments for ``timm.create_model`` and notes explaining them."""
    kw: dict[str, Any] = {}
    notes: list[str] = []
    if family not in _FAMILY_NORM_CONVENTION:
        notes.append(
            f"timm family {family!r} has no known norm/act keywords: built with its "
            "defaults, every norm and activation swapped afterwards"
        )
        return kw, notes
    convention = _FAMILY_NORM_CONVENTION[family]
    # functools.partial of a plain function: timm's get_norm_layer/get_norm_act_layer unbind
    # and re-bind partials and pass plain functions through untouched.
    if convention is not None:
        norm_kw: dict[str, Any] = {"kind": norm, "groups": groups}
        if convention is _norm_act:
            norm_kw["act"] = act
        kw["norm_layer"] = functools.partial(convention, **norm_kw)
    else:
        notes.append(
            f"{family}: norm_layer is fixed by timm's generator; norms swapped after construction"
        )
    kw["act_layer"] = functools.partial(_act_layer, act)
    if family == "mobilenetv3":
        notes.append(
            "mobilenetv3: per-block ReLU overrides ('nre' blocks) and the ReLU timm "
            "forces inside squeeze-excite are swapped to the requested act"
        )
    if family in ("resnet", "regnet"):
        kw["zero_init_last"] = False  # agelab applies its own residual init (see _init_residual)
    if family == "convnext":
        # timm insists on conv_mlp=True for a custom norm_layer so every norm sees NCHW; the
        # 1×1-conv MLP is mathematically the same as the Linear MLP it replaces.
        kw["conv_mlp"] = True
        notes.append(
            "convnext built with conv_mlp=True (1×1-conv MLP ≡ Linear MLP) so every "
            "norm sees NCHW input"
        )
    if family == "vision_transformer":
        kw["img_size"] = img_size
        notes.append(
            "vit: norm applies to tokens as spatial positions (layer = standard token "
            "LayerNorm; batch/instance over tokens; group over channel groups × tokens)"
            "; attention softmax is not an activation and is kept"
        )
        if norm not in ADAPTIVE_NORMS and from_scratch:
            kw["init_values"] = VIT_NO_NORM_LAYER_SCALE
    return kw, notes


# ------------------------------------------------------------------------------ the swap


def norm_kind(m: nn.Module) -> str | None:
    """Registry kind of a normalisation module (``None`` if it is not a known norm)."""
    if isinstance(m, NoNorm):
        return "none"
    if type(m).__name__ in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"):
        return "frozen_batch"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batch"
    if isinstance(m, nn.GroupNorm):
        return "group"
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return "instance"
    if isinstance(m, nn.LayerNorm):
        return "layer"
    return None


_NORM_LIKE = re.compile(r"(Batch|Group|Layer|Instance|Rms|Evo|FilterResponse|Simple)Norm")


def _norm_layout(m: nn.Module) -> str | None:
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


def _norm_channels(m: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(m, attr, None), int):
            return getattr(m, attr)
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    return int(m.weight.shape[0])


def _replace(root: nn.Module, qname: str, new: nn.Module) -> None:
    parent_name, _, attr = qname.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def _swap_norms(root: nn.Module, kind: str, groups: int) -> int:
    """Replace every norm of another kind (or GroupNorm of another group count). Returns the
    number replaced; raises ModelError for norm-like modules agelab cannot place."""
    swapped, unknown = 0, []
    replaced: list[str] = []
    for qname, m in list(root.named_modules()):
        if any(qname.startswith(p + ".") for p in replaced):
            continue  # inside a module already replaced
        k = norm_kind(m)
        if k is None:
            if _NORM_LIKE.search(type(m).__name__) and not isinstance(m, _OWN_MODULES):
                unknown.append(f"{qname} ({type(m).__name__})")
            continue
        if k == kind and not (
            kind == "group" and m.num_groups != _group_count(m.num_channels, groups)
        ):
            continue
        layout = _norm_layout(m)
        if layout is None:
            unknown.append(f"{qname} ({type(m).__name__}, unsupported layout)")
            continue
        new = NORMS[kind](_norm_channels(m), groups)
        if layout == "last":
            new = LastDimNorm(new) if kind != "layer" else nn.LayerNorm(_norm_channels(m))
        act = getattr(m, "act", None)
        if isinstance(act, nn.Module):  # a timm NormAct layer: keep its act (swapped later)
            drop = getattr(m, "drop", None)
            new = NormAct(new, act, drop if isinstance(drop, nn.Module) else None)
        _replace(root, qname, new)
        replaced.append(qname)
        swapped += 1
    if unknown:
        raise ModelError(
            f"cannot swap {len(unknown)} normalisation layer(s) of unknown kind: "
            f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}; "
            f"use one of the supported backbones: {', '.join(SUPPORTED_BACKBONES)}"
        )
    return swapped


def _swap_acts(root: nn.Module, act: str) -> int:
    target = type(ACTS[act]())
    swapped = 0
    for qname, m in list(root.named_modules()):
        if isinstance(m, TRUNK_ACT_CLASSES) and type(m) is not target:
            _replace(root, qname, ACTS[act]())
            swapped += 1
    return swapped


# ------------------------------------------------------------------- functional detection


class _ActOpRecorder(TorchDispatchMode):
    """Records activation aten ops that run while no activation/gate module is executing."""

    def __init__(self, stack: list[tuple[str, nn.Module]]):
        super().__init__()
        self.stack = stack
        self.calls: dict[str, Counter] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket.__name__
        op = op[:-1] if op.endswith("_") and not op.startswith("_") else op
        if op in TRUNK_ACT_OPS or op in GATE_OPS:
            inside = any(isinstance(m, TRUNK_ACT_CLASSES + GATE_CLASSES) for _, m in self.stack)
            if not inside:
                where = self.stack[-1] if self.stack else ("", None)
                label = f"{where[0] or '(model)'} ({type(where[1]).__name__})"
                self.calls.setdefault(op, Counter())[label] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[tuple[str, nn.Module]]]:
    stack: list[tuple[str, nn.Module]] = []

    # Hooks must return None: a value returned by a hook replaces the module's input/output.
    def push(qname: str, mod: nn.Module) -> None:
        stack.append((qname, mod))

    def pop() -> None:
        if stack:
            stack.pop()

    handles = []
    for qname, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda mod, args, q=qname: push(q, mod)))
        handles.append(m.register_forward_hook(lambda mod, args, out: pop(), always_call=True))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _summarise_calls(calls: dict[str, Counter]) -> dict[str, dict[str, Any]]:
    return {
        op: {"calls": sum(c.values()), "where": sorted(c)[:8]} for op, c in sorted(calls.items())
    }


def functional_activation_calls(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Activation ops (relu, gelu, silu, hardswish, tanh, sigmoid, …) that a forward pass of
    ``model`` on ``x`` applies *outside* any activation module — e.g. ``F.relu`` called in a
    ``forward`` — which a module swap cannot change.

    Returns ``{op: {"calls": n, "where": ["qualified.module (Class)", …]}}``; ``{}`` means every
    activation is a module. Runs in eval mode without gradients (mode restored afterwards).
    Detection is at the aten level (a ``TorchDispatchMode``), so tensor methods such as
    ``x.relu()`` and C++-level calls are caught too.
    """
    was_training = model.training
    model.eval()
    try:
        with _module_stack(model) as stack, torch.no_grad():
            recorder = _ActOpRecorder(stack)
            with recorder:
                model(x)
    finally:
        model.train(was_training)
    return _summarise_calls(recorder.calls)


@functools.cache
def _ops_of_act(act: str) -> frozenset[str]:
    """aten ops the registry activation ``act`` runs (so a functional call of the *requested*
    activation can be told apart from a contradicting one)."""
    mode = _ActOpRecorder([])
    with torch.no_grad(), mode:
        ACTS[act]()(torch.zeros(2))
    return frozenset(mode.calls)


class _PositionRecorder(nn.Module):
    """Probe stand-in for an instance norm: records how many spatial positions it sees (an
    instance norm raises on a single position, even in eval mode) and passes x through."""

    def __init__(self, qname: str, seen: dict[str, int]):
        super().__init__()
        self.qname, self.seen = qname, seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen[self.qname] = int(x.shape[2:].numel())
        return x


def _probe(backbone: nn.Module, img_size: int) -> tuple[dict, dict[str, int], int]:
    """One eval forward pass: functional activation calls, the spatial positions each instance
    norm sees and the feature width."""
    positions: dict[str, int] = {}
    instance = [(q, m) for q, m in backbone.named_modules() if norm_kind(m) == "instance"]
    for qname, _ in instance:
        _replace(backbone, qname, _PositionRecorder(qname, positions))
    gen = torch.Generator().manual_seed(0)  # a local generator: building never moves the RNG
    x = torch.randn(1, 3, img_size, img_size, generator=gen)
    was_training = backbone.training
    backbone.eval()
    try:
        with _module_stack(backbone) as stack, torch.no_grad():
            recorder = _ActOpRecorder(stack)
            with recorder:
                out = backbone(x)
    except Exception as exc:
        raise ModelError(
            f"a forward pass of the backbone on {img_size}×{img_size} input failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        backbone.train(was_training)
        for qname, m in instance:
            _replace(backbone, qname, m)
    if out.ndim != 2:
        raise ModelError(
            f"backbone returned features of shape {tuple(out.shape)}; expected "
            "pooled [batch, features] (timm num_classes=0)"
        )
    return _summarise_calls(recorder.calls), positions, int(out.shape[1])


# -------------------------------------------------------------------------- initialisation


_ACT_GAIN = {
    "relu": math.sqrt(2.0),
    "leaky_relu": nn.init.calculate_gain("leaky_relu", 0.01),
    "tanh": 5.0 / 3.0,
}  # gelu/silu/mish/elu: ReLU-like, √2 (see _act_gain)


def _act_gain(act: str) -> float:
    return _ACT_GAIN.get(act, math.sqrt(2.0))


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


def _init_residual(backbone: nn.Module, family: str, norm: str, act: str) -> dict[str, Any]:
    """agelab's residual initialisation (applied when built from scratch).

    adaptive norms: zero γ of the last norm of each residual branch, for the families where
    timm does it (ResNet/RegNet), whatever the norm kind.
    none / frozen_batch: Kaiming fan-in init of every conv/linear (gain of the requested
    activation) so the un-normalised forward keeps unit variance, plus a SkipInit gain (α=0)
    at the end of every residual branch; ConvNeXt keeps its LayerScale (γ=1e-6) and ViT gets
    LayerScale (``init_values``), the transformer analogue.
    """
    ends = _residual_branch_ends(backbone)
    if norm in ADAPTIVE_NORMS:
        zeroed = 0
        if family in _ZERO_INIT_LAST_FAMILIES:
            for _, m in ends:
                w = getattr(m, "weight", None)
                if isinstance(w, nn.Parameter):
                    nn.init.zeros_(w)
                    zeroed += 1
        return {"scheme": "zero_init_last" if zeroed else "timm default", "zeroed_norms": zeroed}

    rescaled = 0
    if family != "vision_transformer":
        gain = _act_gain(act)
        for m in backbone.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                nn.init.normal_(m.weight, std=gain / math.sqrt(fan_in))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                rescaled += 1
    for path, m in ends:
        _replace(backbone, path, SkipInit(m))
    info: dict[str, Any] = {
        "scheme": "no-norm",
        "fan_in_rescaled": rescaled,
        "skipinit_gains": len(ends),
    }
    layer_scales = sum(type(m).__name__ == "LayerScale" for m in backbone.modules())
    if family == "convnext" or layer_scales:
        info["layer_scale"] = layer_scales or "convnext gamma (1e-6)"
    if not ends and not layer_scales and family != "convnext":
        info["warning"] = (
            "no residual blocks known for this architecture: only the fan-in init is applied"
        )
    return info


# ---------------------------------------------------------------------------------- weights


def _load_weights(backbone: nn.Module, timm_name: str, weights: Path) -> dict[str, Any]:
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"pretrained weights file {path} does not exist")
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
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = backbone.state_dict()
    classifier = timm.models.get_pretrained_cfg(timm_name)
    head = getattr(classifier, "classifier", None) or "fc"
    heads = head if isinstance(head, (list, tuple)) else [head]
    dropped = [k for k in state if k not in own and any(k.startswith(h + ".") for h in heads)]
    for k in dropped:  # the ImageNet classifier: agelab has its own head
        del state[k]
    for k in [k for k in state if k not in own and k.endswith("num_batches_tracked")]:
        del state[k]  # BN bookkeeping that FrozenBatchNorm2d does not keep
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
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
        raise ModelError(
            f"weights file {path} does not fit backbone {timm_name} as built (norm/act swaps "
            f"change parameter names, img_size changes position embeddings): {'; '.join(parts)}"
        )
    backbone.load_state_dict(state, strict=True)
    return {"file": str(path), "tensors": len(state), "dropped_classifier_keys": len(dropped)}


# ----------------------------------------------------------------------------------- census


_OWN_MODULES = (LastDimNorm, NormAct, SkipInit, InstanceNormSkipped, NoNorm)


def _act_kind(m: nn.Module) -> str:
    for name, factory in ACTS.items():
        if type(m) is type(factory()):
            return name
    return f"other:{type(m).__name__}"


def _count(backbone: nn.Module) -> dict[str, Any]:
    norms: Counter = Counter()
    norm_kinds: Counter = Counter()
    acts: Counter = Counter()
    act_kinds: Counter = Counter()
    gates: Counter = Counter()
    group_counts: Counter = Counter()
    for m in backbone.modules():
        k = norm_kind(m)
        if k is not None:
            norms[type(m).__name__] += 1
            norm_kinds[k] += 1
            if isinstance(m, nn.GroupNorm):
                group_counts[str(m.num_groups)] += 1
        elif isinstance(m, TRUNK_ACT_CLASSES):
            acts[type(m).__name__] += 1
            act_kinds[_act_kind(m)] += 1
        elif isinstance(m, GATE_CLASSES):
            gates[type(m).__name__] += 1
    out = {
        "norms": dict(norms),
        "norm_kinds": dict(norm_kinds),
        "acts": dict(acts),
        "act_kinds": dict(act_kinds),
        "gates": dict(gates),
    }
    if group_counts:
        out["group_counts"] = dict(group_counts)
    return out


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------- the factory


def build_model(
    backbone: str,
    norm: str,
    act: str,
    *,
    img_size: int,
    out_dim: int = 1,
    groups: int = 8,
    pretrained: bool = False,
    weights: str | Path | None = None,
    drop_rate: float = 0.0,
    seed: int | None = None,
) -> tuple[AgeRegressor, dict[str, Any]]:
    """Build ``backbone`` (any timm name) with ``norm``/``act`` from the registries.

    Returns ``(model, census)``. ``seed`` makes the initialisation reproducible without touching
    the global RNG (``None``: draw from it). ``pretrained=True`` needs a local ``weights`` file
    (``.safetensors`` or a torch state dict); nothing is ever downloaded.
    Raises :class:`ModelError` (a ``ValueError``) for requests that cannot be honoured.
    """
    try:
        name = resolve_backbone(backbone)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    if norm not in NORMS:
        raise ModelError(f"unknown norm {norm!r}; valid choices: {', '.join(NORMS)}")
    if act not in ACTS:
        raise ModelError(f"unknown act {act!r}; valid choices: {', '.join(ACTS)}")
    if groups < 1:
        raise ModelError(f"groups must be ≥ 1 (got {groups})")
    if pretrained and weights is None:
        raise ModelError(
            f"pretrained=true for {name} needs a local weights file (model.weights=/path/to/"
            f"{name}.safetensors or .pth): agelab never downloads weights"
        )
    if weights is not None and not pretrained:
        raise ModelError(
            f"a weights file ({weights}) is set but pretrained=false; set "
            "model.pretrained=true to load it, or drop model.weights"
        )
    return _build(
        name, norm, act, img_size=img_size, out_dim=out_dim, groups=groups,
        drop_rate=drop_rate, seed=seed, pretrained=pretrained,
        weights=Path(weights) if weights is not None else None,
    )  # fmt: skip


def rebuild_model(spec: dict[str, Any], *, seed: int | None = 0) -> tuple[AgeRegressor, dict]:
    """The architecture recorded in ``AgeRegressor.spec`` (e.g. a checkpoint's), freshly
    initialised: a spec built from pretrained weights is rebuilt with the same structure (no
    no-norm init modules) but without reading the weights file again."""
    for key in ("backbone", "norm", "act", "img_size", "out_dim", "groups", "drop_rate"):
        if key not in spec:
            raise ModelError(f"model spec lacks {key!r}: {spec}")
    if spec["norm"] not in NORMS or spec["act"] not in ACTS:
        raise ModelError(f"model spec names an unknown norm/act: {spec}")
    return _build(
        resolve_backbone(spec["backbone"]), spec["norm"], spec["act"],
        img_size=int(spec["img_size"]), out_dim=int(spec["out_dim"]), groups=int(spec["groups"]),
        drop_rate=float(spec["drop_rate"]), seed=seed,
        pretrained=bool(spec.get("pretrained", False)), weights=None,
    )  # fmt: skip


def _build(
    name: str,
    norm: str,
    act: str,
    *,
    img_size: int,
    out_dim: int,
    groups: int,
    drop_rate: float,
    seed: int | None,
    pretrained: bool,
    weights: Path | None,
) -> tuple[AgeRegressor, dict[str, Any]]:
    family = _family(name)
    kwargs, notes = _constructor_kwargs(family, norm, act, groups, img_size, not pretrained)
    if family in _FAMILY_NORM_CONVENTION:
        # Fallback for a model of a known family whose constructor lacks one of the keywords:
        # timm defaults, and the swap does all the work.
        attempts = [kwargs, {"img_size": img_size} if family == "vision_transformer" else {}]
    else:
        attempts = [{"img_size": img_size}, {}]  # transformers need img_size; CNNs reject it
    with _seeded(seed):
        for i, attempt in enumerate(attempts):
            try:
                net = timm.create_model(name, pretrained=False, num_classes=0, **attempt)
            except TypeError as exc:
                if i + 1 == len(attempts):
                    raise ModelError(f"timm cannot build {name}: {exc}") from exc
                if kwargs and attempt is kwargs:
                    notes.append(
                        f"constructor keywords rejected ({exc}); built with timm "
                        "defaults and swapped"
                    )
                continue
            kwargs = attempt
            break
        swapped_norms = _swap_norms(net, norm, groups)
        swapped_acts = _swap_acts(net, act)

        functional, positions, num_features = _probe(net, img_size)
        single = sorted(q for q, p in positions.items() if p == 1)
        for qname in single:
            _replace(net, qname, InstanceNormSkipped())
        if single:
            notes.append(
                f"instance norm undefined on a single position: {len(single)} built as "
                f"identity ({', '.join(single[:4])}{' …' if len(single) > 4 else ''})"
            )

        trunk_calls = {op: v for op, v in functional.items() if op in TRUNK_ACT_OPS}
        gate_calls = {op: v for op, v in functional.items() if op in GATE_OPS}
        contradicting = {op: v for op, v in trunk_calls.items() if op not in _ops_of_act(act)}
        if contradicting:
            detail = "; ".join(
                f"{op} ×{v['calls']} in {', '.join(v['where'][:3])}"
                for op, v in contradicting.items()
            )
            raise ModelError(
                f"backbone {name} applies activations functionally in forward ({detail}); a "
                f"module swap cannot change them, so act={act!r} would be only partly applied. "
                f"Use act={next(iter(contradicting))!r} with this backbone or one of: "
                f"{', '.join(SUPPORTED_BACKBONES)}"
            )
        if trunk_calls:
            notes.append(f"functional {', '.join(trunk_calls)} calls match the requested act")
        if gate_calls:
            notes.append(f"functional gates kept: {', '.join(gate_calls)}")

        if pretrained:
            # Pretrained weights are used as they are: no residual re-initialisation, no
            # SkipInit modules (weights=None: rebuilding that structure for a checkpoint).
            init = {"scheme": "pretrained"}
            if weights is not None:
                init.update(_load_weights(net, name, weights))
            if norm not in ADAPTIVE_NORMS:
                notes.append("pretrained: no-norm initialisation not applied")
        else:
            init = _init_residual(net, family, norm, act)
        spec = {
            "backbone": name,
            "norm": norm,
            "act": act,
            "img_size": int(img_size),
            "out_dim": int(out_dim),
            "groups": int(groups),
            "drop_rate": float(drop_rate),
            "pretrained": bool(pretrained),
        }
        model = AgeRegressor(net, num_features, out_dim, drop_rate, spec)

    if any(m.num_groups != groups for m in net.modules() if isinstance(m, nn.GroupNorm)):
        notes.append(f"GroupNorm groups = largest divisor of the channel count ≤ {groups}")
    if any(isinstance(m, GATE_CLASSES) for m in net.modules()):
        notes.append(
            "sigmoid/hard-sigmoid gates (squeeze-excite) kept: gates, not trunk activations"
        )
    census: dict[str, Any] = {
        "backbone": name,
        "family": family,
        "requested": {"norm": norm, "act": act, "groups": int(groups)},
        **_count(net),
        "functional_activations": trunk_calls,
        "functional_gates": gate_calls,
        "built_with": sorted(k for k in kwargs if k in ("norm_layer", "act_layer")),
        "constructor_extra": {
            k: v for k, v in kwargs.items() if k not in ("norm_layer", "act_layer")
        },
        "swapped": {"norm": swapped_norms, "act": swapped_acts},
        "instance_norms_skipped": single,
        "init": init,
        "img_size": int(img_size),
        "num_features": num_features,
        "params": sum(p.numel() for p in model.parameters()),
        "notes": notes,
    }
    return model, census


def build_model_from_config(
    cfg: Any,
    img_size: int,
    loss: str = "l1",
    *,
    huber_delta: float = 1.0,
    max_age: float = 120.0,
    seed: int | None = None,
) -> tuple[AgeRegressor, dict[str, Any]]:
    """:func:`build_model` from a :class:`agelab.config.ModelConfig`, with the head sized for
    ``loss`` (``dex``: ``max_age + 1`` bins) and the loss attached for
    :meth:`AgeRegressor.to_age`."""
    from agelab.losses import make_loss

    loss_fn = make_loss(loss, huber_delta=huber_delta, max_age=max_age)
    model, census = build_model(
        cfg.backbone,
        cfg.norm,
        cfg.act,
        img_size=img_size,
        out_dim=loss_fn.head_dim,
        groups=cfg.groups,
        pretrained=cfg.pretrained,
        weights=cfg.weights,
        drop_rate=cfg.drop_rate,
        seed=seed,
    )
    model.loss = loss_fn
    census["loss"] = loss_fn.spec()
    return model, census

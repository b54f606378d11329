"""Activation choices (``model.act``): the registry, and which modules and ops count as
activations.

Each :data:`ACTS` entry holds the module class and the Kaiming gain the no-norm
initialisation uses for it. Adding an activation is one entry; :func:`get_act` fails on an
unknown name with the list of valid ones. Activations are always built out of place: with
``norm: none`` an in-place activation would overwrite the conv output that autograd may still
need, and the ablation cells stay comparable.

Sigmoid / hard-sigmoid modules are *gates* (they scale features in squeeze-excite blocks), not
trunk activations: the swap keeps them and the census counts them separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from timm.layers import activations as timm_acts
from torch import nn

from agelab.errors import ModelError

__all__ = [
    "ACTS",
    "GATE_CLASSES",
    "GATE_OPS",
    "TRUNK_ACT_CLASSES",
    "TRUNK_ACT_OPS",
    "Act",
    "act_kind",
    "get_act",
]


@dataclass(frozen=True)
class Act:
    """A registry entry; ``ACTS[name]()`` builds the module with its default arguments."""

    layer: type[nn.Module]
    gain: float  # Kaiming gain: std = gain / √fan_in keeps unit variance without norms

    def __call__(self) -> nn.Module:
        return self.layer()


# ReLU-like activations (ELU, GELU, SiLU, Mish) take ReLU's √2; tanh's 5/3 and leaky ReLU's
# √(2 / (1 + slope²)) are torch.nn.init.calculate_gain's.
RELU_GAIN = math.sqrt(2.0)
ACTS: dict[str, Act] = {
    "relu": Act(nn.ReLU, RELU_GAIN),
    "leaky_relu": Act(nn.LeakyReLU, nn.init.calculate_gain("leaky_relu", 0.01)),
    "elu": Act(nn.ELU, RELU_GAIN),
    "gelu": Act(nn.GELU, RELU_GAIN),
    "silu": Act(nn.SiLU, RELU_GAIN),
    "tanh": Act(nn.Tanh, 5.0 / 3.0),
    "mish": Act(nn.Mish, RELU_GAIN),
}


def get_act(name: str) -> Act:
    """The registry entry ``name``; an unknown name raises :class:`ModelError` listing all."""
    if name not in ACTS:
        raise ModelError(f"unknown act {name!r}; valid choices: {', '.join(ACTS)}")
    return ACTS[name]


# Trunk activation classes a swap replaces, and gate classes it keeps.
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
# for the functional-call detector (agelab.models.probe).
TRUNK_ACT_OPS = frozenset({
    "relu", "gelu", "silu", "hardswish", "elu", "leaky_relu", "mish", "tanh", "hardtanh",
    "celu", "selu", "softplus", "prelu", "_prelu_kernel", "rrelu_with_noise", "threshold",
})  # fmt: skip
GATE_OPS = frozenset({"sigmoid", "hardsigmoid"})


def act_kind(m: nn.Module) -> str:
    """Registry name of an activation module, or ``other:<Class>``."""
    for name, act in ACTS.items():
        if type(m) is act.layer:
            return name
    return f"other:{type(m).__name__}"

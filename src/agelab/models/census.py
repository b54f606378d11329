"""The census: a plain dict that proves what was built — the count of every normalisation and
activation module class in the backbone, which kinds were requested, what was changed after
construction, what was left alone on purpose and whether the forward pass applies any
activation functionally (where no module swap can reach)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import nn

from agelab.models.acts import GATE_CLASSES, TRUNK_ACT_CLASSES, act_kind
from agelab.models.norms import norm_kind
from agelab.models.regressor import AgeRegressor

__all__ = ["count_modules", "make_census"]

_TIMM_LAYER_KEYWORDS = ("norm_layer", "act_layer")


def count_modules(backbone: nn.Module) -> dict[str, Any]:
    """Norm, activation and gate modules by class and by registry kind."""
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
            act_kinds[act_kind(m)] += 1
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


def make_census(
    model: AgeRegressor,
    *,
    family: str,
    kwargs: dict[str, Any],
    functional: tuple[dict, dict],
    swapped: dict[str, int],
    skipped: list[str],
    init: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    """The census of ``model`` (built from ``model.spec``) and the facts of its build:
    constructor ``kwargs``, (trunk, gate) ``functional`` calls, ``swapped`` counts, the
    instance norms ``skipped``, the ``init`` census and the build ``notes``."""
    net, spec = model.backbone, model.spec
    if any(m.num_groups != spec["groups"] for m in net.modules() if isinstance(m, nn.GroupNorm)):
        notes.append(f"GroupNorm groups = largest divisor of the channel count ≤ {spec['groups']}")
    if any(isinstance(m, GATE_CLASSES) for m in net.modules()):
        notes.append(
            "sigmoid/hard-sigmoid gates (squeeze-excite) kept: gates, not trunk activations"
        )
    trunk_calls, gate_calls = functional
    return {
        "backbone": spec["backbone"],
        "family": family,
        "requested": {"norm": spec["norm"], "act": spec["act"], "groups": spec["groups"]},
        **count_modules(net),
        "functional_activations": trunk_calls,
        "functional_gates": gate_calls,
        "built_with": sorted(k for k in kwargs if k in _TIMM_LAYER_KEYWORDS),
        "constructor_extra": {k: v for k, v in kwargs.items() if k not in _TIMM_LAYER_KEYWORDS},
        "swapped": swapped,
        "instance_norms_skipped": skipped,
        "init": init,
        "img_size": spec["img_size"],
        "num_features": model.head.in_features,
        "params": sum(p.numel() for p in model.parameters()),
        "notes": notes,
    }

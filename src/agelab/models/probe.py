"""The probe forward pass: what a module census cannot see.

One eval forward pass of a built backbone (a) records activation ops applied *functionally*
(``F.relu`` in a ``forward``, ``x.relu()``), which no module swap can change, and (b) counts
the spatial positions each instance norm sees (its statistics are undefined on one).
Detection is at the aten level (a ``TorchDispatchMode``), so C++-level calls are caught too.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from agelab.errors import ModelError
from agelab.models.acts import ACTS, GATE_CLASSES, GATE_OPS, TRUNK_ACT_CLASSES, TRUNK_ACT_OPS
from agelab.models.backbones import SUPPORTED_BACKBONES
from agelab.models.norms import InstanceNormSkipped, norm_kind
from agelab.models.swap import replace_module

__all__ = [
    "check_functional_activations",
    "functional_activation_calls",
    "probe",
    "skip_single_position_norms",
]


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


def _recorded_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, _ActOpRecorder]:
    """``model(x)`` in eval mode without gradients, recording activation ops (mode restored)."""
    was_training = model.training
    model.eval()
    try:
        with _module_stack(model) as stack, torch.no_grad():
            recorder = _ActOpRecorder(stack)
            with recorder:
                out = model(x)
    finally:
        model.train(was_training)
    return out, recorder


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
    """
    _, recorder = _recorded_forward(model, x)
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


def probe(backbone: nn.Module, img_size: int) -> tuple[dict, dict[str, int], int]:
    """One eval forward pass: functional activation calls, the spatial positions each instance
    norm sees and the feature width."""
    positions: dict[str, int] = {}
    instance = [(q, m) for q, m in backbone.named_modules() if norm_kind(m) == "instance"]
    for qname, _ in instance:
        replace_module(backbone, qname, _PositionRecorder(qname, positions))
    gen = torch.Generator().manual_seed(0)  # a local generator: building never moves the RNG
    x = torch.randn(1, 3, img_size, img_size, generator=gen)
    try:
        out, recorder = _recorded_forward(backbone, x)
    except Exception as exc:
        raise ModelError(
            f"a forward pass of the backbone on {img_size}×{img_size} input failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for qname, m in instance:
            replace_module(backbone, qname, m)
    if out.ndim != 2:
        raise ModelError(
            f"backbone returned features of shape {tuple(out.shape)}; expected "
            "pooled [batch, features] (timm num_classes=0)"
        )
    return _summarise_calls(recorder.calls), positions, int(out.shape[1])


def skip_single_position_norms(
    backbone: nn.Module, positions: dict[str, int], notes: list[str]
) -> list[str]:
    """Build the instance norms that see one position as identities; returns their names."""
    single = sorted(q for q, p in positions.items() if p == 1)
    for qname in single:
        replace_module(backbone, qname, InstanceNormSkipped())
    if single:
        notes.append(
            f"instance norm undefined on a single position: {len(single)} built as "
            f"identity ({', '.join(single[:4])}{' …' if len(single) > 4 else ''})"
        )
    return single


def check_functional_activations(
    functional: dict[str, dict[str, Any]], name: str, act: str, notes: list[str]
) -> tuple[dict, dict]:
    """Split the probe's functional calls into trunk activations and gates; reject a backbone
    whose functional activations contradict ``act`` (a swap cannot reach them)."""
    trunk_calls = {op: v for op, v in functional.items() if op in TRUNK_ACT_OPS}
    gate_calls = {op: v for op, v in functional.items() if op in GATE_OPS}
    contradicting = {op: v for op, v in trunk_calls.items() if op not in _ops_of_act(act)}
    if contradicting:
        detail = "; ".join(
            f"{op} ×{v['calls']} in {', '.join(v['where'][:3])}" for op, v in contradicting.items()
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
    return trunk_calls, gate_calls

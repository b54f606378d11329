"""Age losses by name: ``l1``, ``l2``, ``huber`` (on standardised age) and ``dex``.

Every loss declares the head size it needs (:attr:`AgeLoss.head_dim`) and maps raw model
outputs to ages in years (:meth:`AgeLoss.to_age`), so the trainer and the predictor stay
generic. Regression losses compare the head output with the *standardised* age
``(age − mean) / std`` (mean/std of the training ages, stored as buffers in the model); ``dex``
(Rothe et al., "Deep EXpectation") is a softmax over integer age bins ``0 … max_age`` trained
with cross-entropy against a soft two-bin label and predicts the expectation.

A new loss is a subclass plus one line in :data:`LOSSES`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "AgeLoss",
    "DexLoss",
    "HuberLoss",
    "L1Loss",
    "L2Loss",
    "default_loss_for",
    "make_loss",
]


class AgeLoss:
    """Base class. Options every loss accepts (each uses the ones it needs): ``huber_delta``
    (in standardised-age units) and ``max_age`` (years; sets the dex bins)."""

    name = ""

    def __init__(self, *, huber_delta: float = 1.0, max_age: float = 120.0):
        if huber_delta <= 0:
            raise ValueError(f"huber_delta must be > 0 (got {huber_delta})")
        if max_age <= 0:
            raise ValueError(f"max_age must be > 0 (got {max_age})")
        self.huber_delta = float(huber_delta)
        self.max_age = float(max_age)

    @property
    def head_dim(self) -> int:
        return 1

    def __call__(
        self, output: torch.Tensor, ages: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ) -> torch.Tensor:
        """Scalar loss of ``output`` [B, head_dim] against ages in years [B]."""
        raise NotImplementedError

    def to_age(self, output: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Ages in years [B] from ``output`` [B, head_dim]."""
        return output.squeeze(-1) * std + mean

    def spec(self) -> dict[str, Any]:
        """Plain description (checkpoints, tracking): ``make_loss(**spec)`` rebuilds it."""
        return {"name": self.name, "huber_delta": self.huber_delta, "max_age": self.max_age}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


class _Regression(AgeLoss):
    def __call__(self, output, ages, mean, std):
        if output.shape[-1] != 1:
            raise ValueError(f"loss {self.name!r} needs a 1-output head, got {output.shape[-1]}")
        return self._loss(output.squeeze(-1), (ages - mean) / std)

    def _loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class L1Loss(_Regression):
    name = "l1"

    def _loss(self, pred, target):
        return F.l1_loss(pred, target)


class L2Loss(_Regression):
    name = "l2"

    def _loss(self, pred, target):
        return F.mse_loss(pred, target)


class HuberLoss(_Regression):
    name = "huber"

    def _loss(self, pred, target):
        return F.huber_loss(pred, target, delta=self.huber_delta)


class DexLoss(AgeLoss):
    """Softmax over ``int(max_age) + 1`` integer age bins; the label of age ``a`` puts weight
    ``1 − frac(a)`` on bin ⌊a⌋ and ``frac(a)`` on the next bin, so its expectation is exactly
    ``a`` (ages outside ``[0, max_age]`` are clipped)."""

    name = "dex"

    @property
    def head_dim(self) -> int:
        return int(self.max_age) + 1

    def __call__(self, output, ages, mean, std):
        n = self.head_dim
        if output.shape[-1] != n:
            raise ValueError(
                f"loss 'dex' with max_age {self.max_age:g} needs {n} outputs, "
                f"got {output.shape[-1]}"
            )
        a = ages.clamp(0, n - 1)
        lo = a.floor()
        frac = (a - lo).unsqueeze(-1)
        lo = lo.long().unsqueeze(-1)
        hi = (lo + 1).clamp(max=n - 1)
        logp = F.log_softmax(output, dim=-1)
        return -((1 - frac) * logp.gather(-1, lo) + frac * logp.gather(-1, hi)).mean()

    def to_age(self, output, mean, std):
        bins = torch.arange(output.shape[-1], device=output.device, dtype=output.dtype)
        return output.softmax(dim=-1) @ bins


# name → loss class. One line per entry.
LOSSES: dict[str, type[AgeLoss]] = {
    "l1": L1Loss,
    "l2": L2Loss,
    "huber": HuberLoss,
    "dex": DexLoss,
}


def make_loss(name: str, **options: Any) -> AgeLoss:
    """``make_loss("huber", huber_delta=0.5)``; unknown names raise ``ValueError``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid choices: {', '.join(LOSSES)}")
    return LOSSES[name](**options)


def default_loss_for(out_dim: int) -> AgeLoss:
    """The loss a fresh model predicts with until one is attached: ``l1`` for one output,
    ``dex`` over ``out_dim`` bins otherwise."""
    return make_loss("l1") if out_dim == 1 else make_loss("dex", max_age=out_dim - 1)

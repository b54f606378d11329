"""The age regressor: backbone → pooled features → dropout → linear head.

Under bf16 autocast only the backbone runs in bf16: the head and :meth:`AgeRegressor.to_age`
always run in fp32, so predictions and metrics are fp32 whatever the training precision (a
bf16 standardised age, or DEX's expectation over age bins in bf16, would put ages on
0.25–0.5-year steps)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from agelab.losses import AgeLoss, default_loss_for

__all__ = ["AgeRegressor"]


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
        features = self.dropout(self.backbone(x))
        with _fp32(features):  # the head in fp32, also under autocast
            return self.head(features.float())

    def set_target_stats(self, mean: float, std: float) -> None:
        self.age_mean.fill_(float(mean))
        self.age_std.fill_(float(std))

    def to_age(self, output: torch.Tensor) -> torch.Tensor:
        """Ages in years (fp32, also when called under autocast)."""
        with _fp32(output):
            return self.loss.to_age(output.float(), self.age_mean, self.age_std)


def _fp32(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for ``x``'s device while it is on; otherwise nothing (no context entered:
    the fp32 path stays exactly what it was)."""
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()

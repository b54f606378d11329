"""Drawing primitives of the synthetic faces, and the random texture banks.

Shapes are implicit: a signed distance d (face units, negative inside) becomes anti-aliased
coverage through a linear ramp one pixel wide, clamp(0.5 − d/px, 0, 1). Tensors are
[B, h, w] — a chunk of images, or a window of rows/columns of it — and per-image parameters
are [B, 1, 1] (colours [B, 3, 1, 1]) that broadcast. Helpers whose name ends in "_" work in
place on their first argument (a temporary), which keeps the memory traffic, the cost that
matters here, low.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def n_tex(size: int) -> int:
    """Textures per bank (each image picks some by index; see textures): 64, fewer for
    big images so that the banks stay below ~100 MB."""
    return int(min(64, max(8, (1 << 22) // (size * size))))


def cov_(d: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Coverage from a signed distance; ``inv`` = 1 / ramp width. In place on ``d``."""
    return d.mul_(-inv).add_(0.5).clamp_(0.0, 1.0)


def band_(dist: torch.Tensor, half, inv: torch.Tensor) -> torch.Tensor:
    """Coverage of a line of half-width ``half`` from the distance to its centre curve."""
    return cov_(dist.abs_().sub_(half), inv)


def below(t: torch.Tensor, hi, soft: float) -> torch.Tensor:
    """Soft indicator of t < hi, with a linear ramp ``soft`` wide."""
    return (hi - t).mul_(1.0 / soft).clamp_(0, 1)


def between(t: torch.Tensor, lo, hi, soft: float) -> torch.Tensor:
    """Soft indicator of lo < t < hi, with linear ramps ``soft`` wide."""
    return ((t - lo) * (1.0 / soft)).clamp_(0, 1).mul_(((hi - t) * (1.0 / soft)).clamp_(0, 1))


def ell_fast(x, y, cx, cy, a, b) -> torch.Tensor:
    """Cheap signed-distance proxy for a roundish ellipse: (k² − 1)·min(a, b)/2, with k the
    ellipse norm. Exact in the limit at a circle's edge; the edge ramp of an elongated
    ellipse is softer along its long axis (by the aspect ratio)."""
    dx = (x if cx is None else x - cx) * (1.0 / a)
    dy = (y - cy).mul_(1.0 / b)
    return dx.mul_(dx).addcmul_(dy, dy).sub_(1.0).mul_(0.5 * torch.minimum(a, b))


def ellipse(x, y, cx, cy, a, b) -> torch.Tensor:
    """Approximate signed distance to an ellipse, (k − 1)/|∇k| — good for thin ellipses."""
    ia, ib = 1.0 / a, 1.0 / b
    dx = (x - cx).mul_(ia)
    dy = (y - cy).mul_(ib)
    k = (dx * dx).addcmul_(dy, dy).add_(1e-8).sqrt_()
    gx, gy = dx.mul_(ia), dy.mul_(ib)
    grad = gx.mul_(gx).addcmul_(gy, gy).add_(1e-8).sqrt_()
    return (k - 1.0).mul_(k).div_(grad)


def textures(size: int, seed: int) -> dict[str, torch.Tensor]:
    """Banks of random textures at image size; each image picks some by index.

    coarse: smooth blobs (5×5 cells), std 1 — background texture.
    fine:   smaller blobs (14×14 cells), std 1 — skin blotches and age spots.
    streak: vertical streaks (fine across, longer along; two octaves), ranked to uniform
            [0, 1] — hair strands: a strand is grey where its value is below the grey
            fraction, so the grey share of the hair equals the grey fraction.
    chroma: per-channel white noise, std 1 — the (weaker) colour part of sensor noise.
    """
    gen = torch.Generator().manual_seed(seed)
    k = n_tex(size)

    def smooth(rows: int, cols: int) -> torch.Tensor:
        z = torch.randn(k, 1, rows, cols, generator=gen)
        t = F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        t = t - t.mean(dim=(1, 2), keepdim=True)
        return (t / t.std(dim=(1, 2), keepdim=True)).contiguous()

    streak = smooth(max(3, size // 10), max(8, round(size / 1.2)))  # long thin strands
    streak = (streak + 0.3 * smooth(max(2, size // 16), max(4, size // 4))).view(k, -1)
    ranks = torch.empty_like(streak)
    order = streak.argsort(dim=1)
    ranks.scatter_(
        1, order, torch.arange(streak.shape[1], dtype=torch.float32).expand_as(streak).contiguous()
    )
    return {
        "coarse": smooth(5, 5),
        "fine": smooth(14, 14),
        "chroma": torch.randn(k, 3, size, size, generator=gen),
        "streak": (ranks / (streak.shape[1] - 1)).view(k, size, size),
    }

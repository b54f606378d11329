"""Age bands: default decade edges, band labels and indices, and the per-band error table."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from agelab.metrics.checks import check_edges, check_pair, quiet

MAX_DEFAULT_BANDS = 30


def decade_edges(values: np.ndarray, width: float = 10.0) -> np.ndarray:
    """Edges ``floor(min/w)*w, ..., floor(max/w)*w + w`` covering all values.

    If that would make more than ``MAX_DEFAULT_BANDS`` bands (absurd predictions spanning
    centuries), the width is multiplied by 10 until it does not.
    """
    vmin, vmax = float(np.min(values)), float(np.max(values))
    while (math.floor(vmax / width) - math.floor(vmin / width)) + 1 > MAX_DEFAULT_BANDS:
        width *= 10.0
    lo = math.floor(vmin / width) * width
    hi = math.floor(vmax / width) * width + width
    return np.arange(lo, hi + width / 2, width)


def band_labels(edges: np.ndarray) -> list[str]:
    """Labels for the len(edges)+1 bands: '<e0', '[e0,e1)', ..., '>=e_m'."""

    def f(v: float) -> str:
        return f"{v:g}"

    inner = [f"[{f(a)},{f(b)})" for a, b in itertools.pairwise(edges)]
    return [f"<{f(edges[0])}", *inner, f">={f(edges[-1])}"]


def band_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """0 for values < edges[0], i for edges[i-1] <= v < edges[i], len(edges) beyond the last."""
    return np.searchsorted(edges, values, side="right")


@quiet
def age_band_table(
    y_true: object, y_pred: object, edges: Sequence[float] | None = None, *, by: str = "true"
) -> pd.DataFrame:
    """Per age band: ``band, lo, hi, count, mae, bias`` (band by true age unless by='pred').

    Inner bands are always listed (count 0 -> NaN MAE/bias); the open bands below the first
    and above the last edge only when they hold cases.
    """
    t, p = check_pair(y_true, y_pred, "y_true", "y_pred")
    if by not in ("true", "pred"):
        raise ValueError(f"by must be 'true' or 'pred', got {by!r}")
    key = t if by == "true" else p
    e_ = decade_edges(key) if edges is None else check_edges(edges)
    idx = band_index(key, e_)
    lows = np.concatenate([[-np.inf], e_])
    highs = np.concatenate([e_, [np.inf]])
    rows = []
    e = p - t
    for j, label in enumerate(band_labels(e_)):
        m = idx == j
        count = int(m.sum())
        outer = j == 0 or j == len(e_)
        if outer and count == 0:
            continue
        rows.append(
            {
                "band": label,
                "lo": float(lows[j]),
                "hi": float(highs[j]),
                "count": count,
                "mae": float(np.mean(np.abs(e[m]))) if count else math.nan,
                "bias": float(np.mean(e[m])) if count else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=["band", "lo", "hi", "count", "mae", "bias"])

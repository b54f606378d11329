"""Split-conformal intervals (Vovk et al. 2005; Lei et al. 2018): fitted on the calibration
split, scored on the test split, globally and per predicted-age band ("Mondrian")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agelab.metrics.bands import band_index, band_labels, decade_edges
from agelab.metrics.checks import MetricSet, check_edges, check_levels, check_pair, pct, quiet

DEFAULT_CONFORMAL_LEVELS: tuple[float, ...] = (0.8, 0.9, 0.95)


#: The fewest faces split-conformal intervals are calibrated on (the metrics need 3 points).
#: A study whose conformal split is smaller calibrates on its calib split instead.
MIN_CONFORMAL = 3


def calibration_split(n_conformal: float) -> str:
    """Which split a run's conformal intervals are calibrated on: ``"conformal"`` (faces that
    chose nothing) when it has at least :data:`MIN_CONFORMAL` faces, else ``"calib"``
    (which chose the epoch: its coverage is slightly optimistic). NaN (unknown) is calib."""
    return "conformal" if n_conformal >= MIN_CONFORMAL else "calib"


def conformal_docs(levels: Sequence[float]) -> dict[str, str]:
    """The docs of the conformal scalars :func:`conformal_intervals` returns for ``levels``."""
    docs = {}
    for lv in levels:
        p = pct(lv)
        docs[f"conformal_{p}_coverage"] = (
            f"test share inside the split-conformal {p}% interval (global calib quantile)"
        )
        docs[f"conformal_{p}_width"] = (
            f"width (2q, years) of the global split-conformal {p}% interval"
        )
        docs[f"conformal_band_{p}_coverage"] = (
            f"test share inside the {p}% interval with q per predicted-age band"
        )
        docs[f"conformal_band_{p}_width"] = (
            f"mean width (years) of the {p}% interval with q per predicted-age band"
        )
    return docs


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """Split-conformal half-width: the ceil((n+1)*level)-th smallest score (inf if > n)."""
    s = np.sort(np.asarray(scores, dtype=float))
    n = s.size
    # subtract a hair so that e.g. (999 + 1) * 0.9 = 900.0000000000001 does not round up to 901
    rank = math.ceil((n + 1) * level - 1e-9)
    return math.inf if rank > n else float(s[max(rank, 1) - 1])


def _pool_bands(counts: Sequence[int], need: int) -> list[list[int]]:
    """Group band indices into contiguous pools holding >= ``need`` calibration points each.

    Bands with enough points stand alone. Consecutive sparse bands are pooled first -- at the
    extremes of the predicted-age range sit the cases with the largest errors, and giving them
    a typical (e.g. the global) quantile badly under-covers them -- then any pool still short
    merges with its smaller neighbour. A single remaining pool means the global quantile.
    """
    groups: list[list[int]] = []
    for j, c in enumerate(counts):
        if c < need and groups and counts[groups[-1][0]] < need:
            groups[-1].append(j)
        else:
            groups.append([j])

    def total(g: list[int]) -> int:
        return sum(counts[i] for i in g)

    while len(groups) > 1:
        short = [i for i, g in enumerate(groups) if total(g) < need]
        if not short:
            break
        i = short[0]
        neighbours = [k for k in (i - 1, i + 1) if 0 <= k < len(groups)]
        k = min(neighbours, key=lambda k: total(groups[k]))  # ties: the left neighbour
        lo, hi = sorted((i, k))
        groups[lo : hi + 1] = [groups[lo] + groups[hi]]
    return groups


@dataclass(frozen=True)
class ConformalInterval:
    """Split-conformal interval ``prediction +- q`` at one level, plus the band variant.

    ``band_q[j]`` is the half-width for band j of ``band_edges`` by *predicted* age (bands as
    in :func:`~agelab.metrics.age_band_table`: index 0 is below the first edge, the last one
    above the last edge); ``band_n[j]`` its calibration count; ``band_fallback[j]`` is True
    when the band had too few calibration points for its own quantile and ``band_pool[j]``
    names the bands whose points were used instead (``"all"`` = the global quantile).
    """

    level: float
    q: float
    n_calib: int
    band_edges: tuple[float, ...]
    band_q: tuple[float, ...]
    band_n: tuple[int, ...]
    band_fallback: tuple[bool, ...]
    band_pool: tuple[str, ...]

    @property
    def band_labels(self) -> list[str]:
        return band_labels(np.asarray(self.band_edges))

    def half_width(self, y_pred: object, banded: bool = False) -> np.ndarray:
        """Interval half-width for each prediction (global q, or the q of its band)."""
        p = np.asarray(y_pred, dtype=float).reshape(-1)
        if not banded:
            return np.full(p.shape, self.q)
        return np.asarray(self.band_q)[band_index(p, np.asarray(self.band_edges))]

    def interval(self, y_pred: object, banded: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper interval ends for new predictions."""
        p = np.asarray(y_pred, dtype=float).reshape(-1)
        h = self.half_width(p, banded)
        return p - h, p + h


def _fit_bands(
    scores: np.ndarray,
    calib_band: np.ndarray,
    edges: np.ndarray,
    level: float,
    q_global: float,
    min_band_calib: int,
    sparse_bands: str,
) -> tuple[list[float], list[bool], list[str]]:
    n_bands = len(edges) + 1
    counts = [int(np.sum(calib_band == j)) for j in range(n_bands)]
    # a band needs min_band_calib points, and enough for a finite quantile at this level
    need = max(min_band_calib, math.ceil(level / (1.0 - level) - 1e-9), 1)
    labels = band_labels(edges)
    band_q, fallback, pool = [math.inf] * n_bands, [False] * n_bands, [""] * n_bands
    # "global": every band is its own group and sparse ones use the global quantile
    merge = sparse_bands == "merge"
    groups = _pool_bands(counts, need) if merge else [[j] for j in range(n_bands)]
    for g in groups:
        n_g = sum(counts[j] for j in g)
        if len(groups) == 1 or (sparse_bands == "global" and n_g < need):
            q_g, name = q_global, "all"
        else:
            q_g = conformal_quantile(scores[np.isin(calib_band, g)], level)
            name = labels[g[0]] if len(g) == 1 else f"{labels[g[0]]}..{labels[g[-1]]}"
        for j in g:
            band_q[j], pool[j] = q_g, name
            fallback[j] = counts[j] < need
    return band_q, fallback, pool


def _fit_level(
    scores: np.ndarray,
    calib_band: np.ndarray,
    edges: np.ndarray,
    level: float,
    min_band_calib: int,
    sparse_bands: str,
) -> ConformalInterval:
    """The global and the banded interval at one level, from the calibration scores."""
    q = conformal_quantile(scores, level)
    band_q, fallback, pool = _fit_bands(
        scores, calib_band, edges, level, q, min_band_calib, sparse_bands
    )
    return ConformalInterval(
        level=level,
        q=q,
        n_calib=scores.size,
        band_edges=tuple(map(float, edges)),
        band_q=tuple(band_q),
        band_n=tuple(int(np.sum(calib_band == j)) for j in range(len(edges) + 1)),
        band_fallback=tuple(fallback),
        band_pool=tuple(pool),
    )


def _score_level(out: MetricSet, ci: ConformalInterval, test_abs: np.ndarray, pt: np.ndarray):
    """Test coverage and width of one level's intervals (global and banded) into ``out``."""
    name, q = pct(ci.level), ci.q
    hw = ci.half_width(pt, banded=True)
    out.put(f"conformal_{name}_coverage", np.mean(test_abs <= q))
    out.put(f"conformal_{name}_width", 2.0 * q)
    out.put(f"conformal_band_{name}_coverage", np.mean(test_abs <= hw))
    out.put(f"conformal_band_{name}_width", np.mean(2.0 * hw))
    if not math.isfinite(q):
        note = (
            f"{ci.n_calib} calibration points are too few for a finite {name}% interval "
            f"(need >= {math.ceil(ci.level / (1 - ci.level) - 1e-9)}): the interval is unbounded"
        )
        for key in ("width", "coverage"):
            out.notes[f"conformal_{name}_{key}"] = note
            out.notes[f"conformal_band_{name}_{key}"] = note


@quiet
def conformal_intervals(
    y_true_calib: object,
    y_pred_calib: object,
    y_true_test: object,
    y_pred_test: object,
    *,
    levels: Sequence[float] = DEFAULT_CONFORMAL_LEVELS,
    band_edges: Sequence[float] | None = None,
    min_band_calib: int = 50,
    sparse_bands: str = "merge",
) -> tuple[MetricSet, dict[float, ConformalInterval]]:
    """Fit split-conformal intervals on the calib split, evaluate coverage/width on test.

    Bands are by predicted age (decades spanning the calibration predictions by default). A
    band with at least ``min_band_calib`` calibration points (and enough for a finite
    quantile) uses its own quantile. Sparse bands: ``sparse_bands="merge"`` (default) pools
    them with adjacent bands (see :func:`_pool_bands`); ``"global"`` gives them the global q.
    """
    tc, pc = check_pair(y_true_calib, y_pred_calib, "y_true_calib", "y_pred_calib")
    tt, pt = check_pair(y_true_test, y_pred_test, "y_true_test", "y_pred_test")
    levels = check_levels(levels)
    if isinstance(min_band_calib, bool) or not isinstance(min_band_calib, (int, np.integer)):
        raise ValueError(f"min_band_calib must be an integer, got {min_band_calib!r}")
    if sparse_bands not in ("merge", "global"):
        raise ValueError(f"sparse_bands must be 'merge' or 'global', got {sparse_bands!r}")
    edges = decade_edges(pc) if band_edges is None else check_edges(band_edges, "band_edges")
    scores = np.abs(pc - tc)
    test_abs = np.abs(pt - tt)
    calib_band = band_index(pc, edges)
    out = MetricSet()
    out.put("n_calib", tc.size)
    fitted: dict[float, ConformalInterval] = {}
    for level in levels:
        ci = _fit_level(scores, calib_band, edges, level, int(min_band_calib), sparse_bands)
        fitted[level] = ci
        _score_level(out, ci, test_abs, pt)
    return out, fitted

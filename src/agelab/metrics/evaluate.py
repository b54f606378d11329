"""``evaluate``: every diagnostic for one run's predictions, as MLflow-ready scalars (named
and documented in :data:`METRIC_DOCS`) plus the tables and intervals behind the figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from agelab.metrics.bands import age_band_table
from agelab.metrics.checks import (
    MetricSet,
    check_edges,
    check_k_max,
    check_levels,
    check_pair,
    pct,
    quiet,
)
from agelab.metrics.conformal import (
    DEFAULT_CONFORMAL_LEVELS,
    ConformalInterval,
    conformal_docs,
    conformal_intervals,
)
from agelab.metrics.coverage import COVERAGE_DOCS, coverage_summary, cs_curve
from agelab.metrics.gennorm import GennormFit, fit_gennorm
from agelab.metrics.point import POINT_DOCS, point_metrics
from agelab.metrics.shape import SHAPE_DOCS, normality

#: Every scalar :func:`evaluate` returns (at the default conformal levels), in order.
METRIC_DOCS: dict[str, str] = {
    **POINT_DOCS,
    **COVERAGE_DOCS,
    **SHAPE_DOCS,
    "n_calib": "number of calibration cases (NaN if no calibration split)",
    **conformal_docs(DEFAULT_CONFORMAL_LEVELS),
}


def metric_names(conformal_levels: Sequence[float] = DEFAULT_CONFORMAL_LEVELS) -> list[str]:
    """The scalar names :func:`evaluate` returns for these conformal levels, in order."""
    base = [k for k in METRIC_DOCS if not k.startswith("conformal_")]
    return base + list(conformal_docs(conformal_levels))


@dataclass
class Diagnostics:
    """Everything :func:`evaluate` computes for one run.

    ``scalars`` are MLflow-ready ``{name: float}`` (see ``METRIC_DOCS``); ``verdict`` /
    ``verdict_reason`` are strings (log them as tags); ``notes`` explain NaNs and caveats.
    """

    scalars: dict[str, float]
    verdict: str
    verdict_reason: str
    cs_curve: pd.DataFrame
    bands: pd.DataFrame
    conformal: dict[float, ConformalInterval]
    notes: dict[str, str] = field(default_factory=dict)
    k_max: int = 15
    shape: GennormFit | None = None  # the generalized-normal fit behind shape_* (for figures)

    def summary(self) -> str:
        """A few human-readable lines (for logs / CLI)."""
        s = self.scalars
        lines = [
            f"n={s['n']:.0f}  MAE {s['mae']:.2f} y  RMSE {s['rmse']:.2f} y  "
            f"bias {s['bias']:+.2f} y",
            f"within MAE: {s['coverage_at_mae']:.1%} observed vs {s['coverage_at_mae_normal']:.1%}"
            f" normal / {s['coverage_at_mae_laplace']:.1%} Laplace theory",
            f"90% of errors within {s['years_for_90']:.2f} y;  shape verdict: {self.verdict}"
            + self._beta_words(),
        ]
        for level, ci in self.conformal.items():
            p = pct(level)
            cov, cov_band = s[f"conformal_{p}_coverage"], s[f"conformal_band_{p}_coverage"]
            lines.append(
                f"conformal {p}%: +-{ci.q:.2f} y, test coverage {cov:.1%} (banded {cov_band:.1%})"
            )
        return "\n".join(lines)

    def _beta_words(self) -> str:
        s = self.scalars
        if math.isnan(s["shape_beta"]):
            return ""
        return (
            f" (beta {s['shape_beta']:.2f}, 95% {s['shape_beta_low']:.2f}-"
            f"{s['shape_beta_high']:.2f}: {s['coverage_at_mae_gennorm']:.1%} within the MAE)"
        )


@quiet
def evaluate(
    y_true_test: object,
    y_pred_test: object,
    y_true_calib: object = None,
    y_pred_calib: object = None,
    *,
    k_max: int = 15,
    age_bands: Sequence[float] | None = None,
    conformal_levels: Sequence[float] = DEFAULT_CONFORMAL_LEVELS,
    min_band_calib: int = 50,
    sparse_bands: str = "merge",
    seed: int = 0,
) -> Diagnostics:
    """All diagnostics for one run's test predictions (and calibration split, if given).

    ``k_max``: last k of the CS curve table. ``age_bands``: band edges in years for the
    per-band table (by true age) and the banded conformal intervals (by predicted age);
    default decades. ``conformal_levels``, ``min_band_calib``, ``sparse_bands``: see
    :func:`~agelab.metrics.conformal_intervals`. ``seed``: the Shapiro-Wilk subsample and the
    jitter that dequantizes residuals on a lattice (integer ages).
    Raises ``ValueError`` naming the argument for invalid input (see the package docstring).
    """
    if sparse_bands not in ("merge", "global"):
        raise ValueError(f"sparse_bands must be 'merge' or 'global', got {sparse_bands!r}")
    t, p = check_pair(y_true_test, y_pred_test, "y_true_test", "y_pred_test")
    k_max = check_k_max(k_max)
    levels = check_levels(conformal_levels)
    edges = None if age_bands is None else check_edges(age_bands)
    _check_calib_pair(y_true_calib, y_pred_calib)
    e = p - t
    shape = fit_gennorm(e, seed)  # once: coverage and shape both use it
    scalars = MetricSet()
    scalars.merge(point_metrics(t, p))
    scalars.merge(coverage_summary(e, seed=seed, shape=shape))  # the shape fit's jitter
    norm = normality(e, t, seed=seed, shape=shape)
    scalars.merge(norm.scalars)
    conformal: dict[float, ConformalInterval] = {}
    if y_true_calib is None:
        scalars.nan("n_calib", "no calibration split given")
        scalars.nan(list(conformal_docs(levels)), "no calibration split given")
    else:
        conf, conformal = conformal_intervals(
            y_true_calib,
            y_pred_calib,
            t,
            p,
            levels=levels,
            band_edges=edges,
            min_band_calib=min_band_calib,
            sparse_bands=sparse_bands,
        )
        scalars.merge(conf)
    return Diagnostics(
        scalars={k: float(v) for k, v in scalars.items()},
        verdict=norm.verdict,
        verdict_reason=norm.verdict_reason,
        cs_curve=cs_curve(e, k_max, shape=shape),
        bands=age_band_table(t, p, edges),
        conformal=conformal,
        notes=_notes_for_nans(scalars),
        k_max=k_max,
        shape=shape,
    )


def _check_calib_pair(y_true_calib: object, y_pred_calib: object) -> None:
    if (y_true_calib is None) != (y_pred_calib is None):
        given = "y_true_calib" if y_pred_calib is None else "y_pred_calib"
        missing = "y_pred_calib" if y_pred_calib is None else "y_true_calib"
        raise ValueError(f"{given} was given without {missing}: pass both or neither")


def _notes_for_nans(scalars: MetricSet) -> dict[str, str]:
    """The notes, with a generic reason for any NaN that has none (a safety net: every NaN
    carries a reason)."""
    notes = dict(scalars.notes)
    for k, v in scalars.items():
        if math.isnan(float(v)) and k not in notes:
            notes[k] = "not computable for this input (numerical degeneracy)"
    return notes

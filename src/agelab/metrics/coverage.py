"""Coverage: the cumulative score CS(k) = share of cases with ``|e| <= k``, observed and as
predicted from the MAE alone by normal and Laplace residuals (see the package docstring for
the formulas), with the KS distance between the observed curve and each prediction."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

from agelab.metrics.checks import (
    TOL,
    MetricSet,
    check_k_max,
    check_residuals,
    is_constant,
    quiet,
)

#: CS(MAE) if residuals are normal with mean 0: 2*Phi(sqrt(2/pi)) - 1 = erf(1/sqrt(pi)).
NORMAL_CS_AT_MAE: float = float(special.erf(1.0 / math.sqrt(math.pi)))
#: CS(MAE) if residuals are Laplace with location 0: 1 - 1/e.
LAPLACE_CS_AT_MAE: float = float(1.0 - math.exp(-1.0))

#: k (years) at which ``coverage_at_<k>`` is always reported.
COVERAGE_KS: tuple[int, ...] = tuple(range(1, 11))
#: Coverage targets (percent) for ``years_for_<p>``.
YEARS_FOR: tuple[int, ...] = (50, 80, 90, 95)

COVERAGE_DOCS: dict[str, str] = {
    "coverage_at_mae": "observed share with |residual| <= MAE",
    "coverage_at_mae_normal": "CS(MAE) predicted by normal residuals: 2*Phi(sqrt(2/pi))-1 = 0.5751",
    "coverage_at_mae_laplace": "CS(MAE) predicted by Laplace residuals: 1 - 1/e = 0.6321",
    "coverage_at_mae_normal_fit": "CS(MAE) predicted by N(bias, resid_sd)",
    **{f"coverage_at_{k}": f"observed share with |residual| <= {k} years" for k in COVERAGE_KS},
    "cs_gap_normal": "max |observed CS(k) - normal-from-MAE CS(k)| over all k >= 0 (KS distance)",
    "cs_gap_laplace": "max |observed CS(k) - Laplace-from-MAE CS(k)| over all k >= 0",
    "cs_gap_normal_fit": "max |observed CS(k) - CS(k) of N(bias, resid_sd)| over all k >= 0",
    **{f"years_for_{p}": f"smallest k with observed CS(k) >= {p}% (years)" for p in YEARS_FOR},
    **{
        f"years_for_{p}_normal": f"years for {p}% coverage predicted from MAE, normal residuals"
        for p in YEARS_FOR
    },
    **{
        f"years_for_{p}_laplace": f"years for {p}% coverage predicted from MAE, Laplace residuals"
        for p in YEARS_FOR
    },
}


@dataclass(frozen=True)
class AbsModel:
    """Distribution of |e| for e ~ N(mu, sigma) or e ~ Laplace(0, b); scale 0 = point mass."""

    kind: str  # "normal" or "laplace"
    scale: float
    mu: float = 0.0

    def cdf(self, k: np.ndarray) -> np.ndarray:
        """P(|e| <= k) for k >= 0."""
        k = np.asarray(k, dtype=float)
        if self.scale <= 0:  # point mass at |mu|
            return (k >= abs(self.mu)).astype(float)
        if self.kind == "laplace":
            return -np.expm1(-k / self.scale)
        return special.ndtr((k - self.mu) / self.scale) - special.ndtr((-k - self.mu) / self.scale)

    def cdf_left(self, k: np.ndarray) -> np.ndarray:
        """P(|e| < k): differs from cdf only at the atom of a point mass."""
        if self.scale <= 0:
            return (np.asarray(k, dtype=float) > abs(self.mu)).astype(float)
        return self.cdf(k)

    def atoms(self) -> list[float]:
        return [abs(self.mu)] if self.scale <= 0 else []

    def quantile(self, p: float) -> float:
        """Smallest k with P(|e| <= k) >= p (only used for mu = 0)."""
        if self.scale <= 0:
            return abs(self.mu)
        if self.kind == "laplace":
            return -self.scale * math.log1p(-p)
        return self.scale * float(special.ndtri((1.0 + p) / 2.0))


def theory_models(e: np.ndarray) -> dict[str, AbsModel]:
    """The |e| distributions predicted from the MAE (normal, Laplace) and from N(bias, sd)."""
    mae = float(np.mean(np.abs(e)))
    sd = 0.0 if is_constant(e) else float(e.std(ddof=1))
    return {
        "normal": AbsModel("normal", mae * math.sqrt(math.pi / 2.0)),
        "laplace": AbsModel("laplace", mae),
        "normal_fit": AbsModel("normal", sd, float(e.mean())),
    }


def share_within(abs_sorted: np.ndarray, k: np.ndarray | float) -> np.ndarray:
    """Observed CS(k) = share of |e| <= k (with TOL slack), from sorted |e|."""
    k = np.asarray(k, dtype=float)
    return np.searchsorted(abs_sorted, k + TOL, side="right") / abs_sorted.size


def _sup_gap(abs_sorted: np.ndarray, model: AbsModel) -> float:
    """Exact sup_{k >= 0} |CS_obs(k) - model CDF(k)|.

    Both are non-decreasing step/continuous functions, so the supremum is attained at (or just
    before) a jump: the distinct observed |e| values and the model's atoms. Between jumps the
    observed curve is flat and the model monotone, so nothing else can be larger.
    """
    n = abs_sorted.size
    u, counts = np.unique(abs_sorted, return_counts=True)
    cum = np.cumsum(counts) / n  # CS_obs(u)
    before = cum - counts / n  # CS_obs(u-)
    gap = max(
        float(np.max(np.abs(cum - model.cdf(u)))),
        float(np.max(np.abs(before - model.cdf_left(u)))),
    )
    for c in model.atoms():
        right = np.searchsorted(abs_sorted, c, side="right") / n
        left = np.searchsorted(abs_sorted, c, side="left") / n
        gap = max(gap, abs(right - float(model.cdf(c))), abs(left - float(model.cdf_left(c))))
    return gap


@quiet
def cs_curve(residuals: object, k_max: int = 15) -> pd.DataFrame:
    """CS(k) for k = 0..k_max: columns ``k, observed, normal, laplace, normal_fit``."""
    e = check_residuals(residuals)
    k_max = check_k_max(k_max)
    ks = np.arange(k_max + 1, dtype=float)
    abs_sorted = np.sort(np.abs(e))
    models = theory_models(e)
    frame = {"k": np.arange(k_max + 1), "observed": share_within(abs_sorted, ks)}
    for name, model in models.items():
        frame[name] = model.cdf(ks)
    return pd.DataFrame(frame)


@quiet
def coverage_summary(residuals: object) -> MetricSet:
    """Observed coverage vs coverage predicted from the MAE (see the package docstring)."""
    e = check_residuals(residuals)
    abs_sorted = np.sort(np.abs(e))
    mae = float(abs_sorted.mean())
    models = theory_models(e)
    out = MetricSet()
    out.put("coverage_at_mae", share_within(abs_sorted, mae))
    # The MAE-only predictions are constants by construction; logged for side-by-side plots.
    out.put("coverage_at_mae_normal", NORMAL_CS_AT_MAE)
    out.put("coverage_at_mae_laplace", LAPLACE_CS_AT_MAE)
    out.put("coverage_at_mae_normal_fit", models["normal_fit"].cdf(mae))
    for k in COVERAGE_KS:
        out.put(f"coverage_at_{k}", share_within(abs_sorted, float(k)))
    for name, model in models.items():
        out.put(f"cs_gap_{name}", _sup_gap(abs_sorted, model))
    for p in YEARS_FOR:
        # smallest k with CS(k) >= p: the ceil(p*n)-th smallest |e| (inverted-CDF quantile)
        out.put(f"years_for_{p}", np.quantile(abs_sorted, p / 100.0, method="inverted_cdf"))
    for p in YEARS_FOR:
        out.put(f"years_for_{p}_normal", models["normal"].quantile(p / 100.0))
    for p in YEARS_FOR:
        out.put(f"years_for_{p}_laplace", models["laplace"].quantile(p / 100.0))
    return out

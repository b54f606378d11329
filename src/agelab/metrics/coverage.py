"""Coverage: the cumulative score CS(k) = share of cases with ``|e| <= k``, observed and as
predicted from the MAE alone by normal, Laplace and generalized-normal residuals (see the
package docstring for the formulas) -- centred on 0 and, for runs with a bias, on the fitted
location -- with the KS distance between the observed curve and each prediction."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

from agelab.metrics.checks import (
    TOL,
    MetricSet,
    check_k_max,
    check_residuals,
    is_constant,
    quiet,
)
from agelab.metrics.gennorm import (
    GennormFit,
    coverage_at_mae_for_beta,
    dequantize,
    fit_gennorm,
    gn_cdf,
    scale_from_mae,
)

#: CS(MAE) if residuals are normal with mean 0: 2*Phi(sqrt(2/pi)) - 1 = erf(1/sqrt(pi)).
NORMAL_CS_AT_MAE: float = float(special.erf(1.0 / math.sqrt(math.pi)))
#: CS(MAE) if residuals are Laplace with location 0: 1 - 1/e.
LAPLACE_CS_AT_MAE: float = float(1.0 - math.exp(-1.0))

#: k (years) at which ``coverage_at_<k>`` is always reported.
COVERAGE_KS: tuple[int, ...] = tuple(range(1, 11))
#: Coverage targets (percent) for ``years_for_<p>``.
YEARS_FOR: tuple[int, ...] = (50, 80, 90, 95)
#: The model curves of ``cs_curve`` / ``cs_gap_<name>`` beyond the observed one, in order.
#: ``<model>`` alone: centred on 0, scale from the MAE; ``_centred``: centred on the model's
#: fitted location (mean, median, GN location), scale from the mean |e - location|.
CENTRED = ("normal_centred", "laplace_centred", "gennorm_centred")
MODELS = ("normal", "laplace", "normal_fit", "gennorm", *CENTRED)

_MODEL_WORDS = {
    "normal": "normal-from-MAE",
    "laplace": "Laplace-from-MAE",
    "normal_fit": "N(bias, resid_sd)",
    "gennorm": "generalized-normal-from-MAE (fitted beta, centred on 0)",
    "normal_centred": "normal centred on the mean, scale from mean |e - mean|",
    "laplace_centred": "Laplace centred on the median, b = mean |e - median|",
    "gennorm_centred": "generalized normal (fitted beta) centred on shape_location",
}


def _years_docs(name: str, words: str) -> dict[str, str]:
    return {
        f"years_for_{p}_{name}": f"years for {p}% coverage predicted by {words}" for p in YEARS_FOR
    }


COVERAGE_DOCS: dict[str, str] = {
    "coverage_at_mae": "observed share with |residual| <= MAE",
    "coverage_at_mae_normal": "CS(MAE) predicted by normal residuals: 2*Phi(sqrt(2/pi))-1 = 0.5751",
    "coverage_at_mae_laplace": "CS(MAE) predicted by Laplace residuals: 1 - 1/e = 0.6321",
    "coverage_at_mae_normal_fit": "CS(MAE) predicted by N(bias, resid_sd)",
    "coverage_at_mae_gennorm": "CS(MAE) predicted by centred GN residuals of the fitted beta",
    **{f"coverage_at_mae_{m}": f"CS(MAE) predicted by the {_MODEL_WORDS[m]}" for m in CENTRED},
    **{f"coverage_at_{k}": f"observed share with |residual| <= {k} years" for k in COVERAGE_KS},
    "cs_gap_normal": "max |observed CS(k) - normal-from-MAE CS(k)| over all k >= 0 (KS distance)",
    "cs_gap_laplace": "max |observed CS(k) - Laplace-from-MAE CS(k)| over all k >= 0",
    "cs_gap_normal_fit": "max |observed CS(k) - CS(k) of N(bias, resid_sd)| over all k >= 0",
    **{
        f"cs_gap_{m}": f"max |observed CS(k) - CS(k) of the {_MODEL_WORDS[m]}| over k >= 0"
        for m in ("gennorm", *CENTRED)
    },
    **{f"years_for_{p}": f"smallest k with observed CS(k) >= {p}% (years)" for p in YEARS_FOR},
    **_years_docs("normal", "normal residuals from the MAE"),
    **_years_docs("laplace", "Laplace residuals from the MAE"),
    **_years_docs("gennorm", "centred GN residuals of the fitted beta, from the MAE"),
    **{k: v for m in CENTRED for k, v in _years_docs(m, f"the {_MODEL_WORDS[m]}").items()},
}


@dataclass(frozen=True)
class AbsModel:
    """Distribution of |e| for e ~ normal / Laplace / GN(mu, scale[, beta]); scale 0 = point
    mass at |mu|."""

    kind: str  # "normal", "laplace" or "gennorm"
    scale: float
    mu: float = 0.0
    beta: float = 2.0  # gennorm only

    def _cdf_e(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "laplace":
            return stats.laplace.cdf(x, self.mu, self.scale)
        if self.kind == "gennorm":
            return gn_cdf(x, self.beta, self.scale, self.mu)
        return special.ndtr((x - self.mu) / self.scale)

    def cdf(self, k: np.ndarray) -> np.ndarray:
        """P(|e| <= k) for k >= 0."""
        k = np.asarray(k, dtype=float)
        if self.scale <= 0:  # point mass at |mu|
            return (k >= abs(self.mu)).astype(float)
        if self.mu != 0.0:
            return self._cdf_e(k) - self._cdf_e(-k)
        if self.kind == "laplace":
            return -np.expm1(-k / self.scale)
        if self.kind == "gennorm":
            return special.gammainc(1.0 / self.beta, (k / self.scale) ** self.beta)
        return special.ndtr(k / self.scale) - special.ndtr(-k / self.scale)

    def cdf_left(self, k: np.ndarray) -> np.ndarray:
        """P(|e| < k): differs from cdf only at the atom of a point mass."""
        if self.scale <= 0:
            return (np.asarray(k, dtype=float) > abs(self.mu)).astype(float)
        return self.cdf(k)

    def atoms(self) -> list[float]:
        return [abs(self.mu)] if self.scale <= 0 else []

    def quantile(self, p: float) -> float:
        """Smallest k with P(|e| <= k) >= p."""
        if not math.isfinite(self.scale) or not math.isfinite(self.mu):
            return math.nan
        if self.scale <= 0:
            return abs(self.mu)
        centred = self._centred_quantile(p)
        if self.mu == 0.0:
            return centred
        # |e| <= |mu| + |e - mu|, so the root lies below |mu| + the centred quantile (doubled
        # in case rounding puts the cdf a hair short of p there)
        top = abs(self.mu) + 2.0 * centred

        def short(k: float) -> float:
            return float(self.cdf(k)) - p

        if short(top) < 0:
            return top
        return float(optimize.brentq(short, 0.0, top, xtol=1e-10))

    def _centred_quantile(self, p: float) -> float:
        if self.kind == "laplace":
            return -self.scale * math.log1p(-p)
        if self.kind == "gennorm":
            return self.scale * float(special.gammaincinv(1.0 / self.beta, p)) ** (1 / self.beta)
        return self.scale * float(special.ndtri((1.0 + p) / 2.0))


def theory_models(e: np.ndarray, shape: GennormFit | None = None) -> dict[str, AbsModel]:
    """The |e| distributions of :data:`MODELS`: predicted from the MAE (centred on 0), from
    N(bias, sd), and the same shapes centred on their fitted locations. ``shape``: the GN fit
    of these residuals (fitted here if not given)."""
    gn = shape if shape is not None else fit_gennorm(e)
    mae = float(np.mean(np.abs(e)))
    sd = 0.0 if is_constant(e) else float(e.std(ddof=1))
    mean, med, loc, beta = float(e.mean()), float(np.median(e)), gn.location, gn.beta

    def spread(c: float) -> float:  # the "MAE" about c (0 for constant residuals: a point mass)
        return 0.0 if sd == 0.0 else float(np.mean(np.abs(e - c)))

    gn_scale = scale_from_mae(mae, beta) if gn.ok else math.nan
    gn_centred = scale_from_mae(spread(loc), beta) if gn.ok else math.nan
    return {
        "normal": AbsModel("normal", mae * math.sqrt(math.pi / 2.0)),
        "laplace": AbsModel("laplace", mae),
        "normal_fit": AbsModel("normal", sd, mean),
        "gennorm": AbsModel("gennorm", gn_scale, beta=beta),
        "normal_centred": AbsModel("normal", spread(mean) * math.sqrt(math.pi / 2.0), mean),
        "laplace_centred": AbsModel("laplace", spread(med), med),
        "gennorm_centred": AbsModel("gennorm", gn_centred, 0.0 if not gn.ok else loc, beta),
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
def cs_curve(
    residuals: object, k_max: int = 15, *, seed: int = 0, shape: GennormFit | None = None
) -> pd.DataFrame:
    """CS(k) for k = 0..k_max: columns ``k, observed`` and one per model of :data:`MODELS`
    (NaN in the GN columns when there is no fit). ``seed``, ``shape``: as in
    :func:`coverage_summary`."""
    e = check_residuals(residuals)
    k_max = check_k_max(k_max)
    ks = np.arange(k_max + 1, dtype=float)
    abs_sorted = np.sort(np.abs(e))
    models = theory_models(e, shape if shape is not None else fit_gennorm(e, seed))
    frame = {"k": np.arange(k_max + 1), "observed": share_within(abs_sorted, ks)}
    for name, model in models.items():
        frame[name] = model.cdf(ks)
    return pd.DataFrame(frame)


@quiet
def coverage_summary(
    residuals: object, *, seed: int = 0, shape: GennormFit | None = None
) -> MetricSet:
    """Observed coverage vs coverage predicted from the MAE (see the package docstring).

    ``shape``: the generalized-normal fit of these residuals (:func:`fit_gennorm`), fitted
    here with ``seed`` (the dequantizing jitter) if not given.
    """
    e = check_residuals(residuals)
    abs_sorted = np.sort(np.abs(e))
    mae = float(abs_sorted.mean())
    gn = shape if shape is not None else fit_gennorm(e, seed)
    models = theory_models(e, gn)
    no_fit = None if gn.ok else f"no generalized-normal fit: {gn.note}"
    out = MetricSet()
    out.put("coverage_at_mae", share_within(abs_sorted, mae))
    # The MAE-only predictions are constants by construction; logged for side-by-side plots.
    out.put("coverage_at_mae_normal", NORMAL_CS_AT_MAE)
    out.put("coverage_at_mae_laplace", LAPLACE_CS_AT_MAE)
    out.put("coverage_at_mae_normal_fit", models["normal_fit"].cdf(mae))
    out.put("coverage_at_mae_gennorm", coverage_at_mae_for_beta(gn.beta), no_fit)
    for name in CENTRED:
        out.put(f"coverage_at_mae_{name}", models[name].cdf(mae), _gn_note(name, no_fit))
    for k in COVERAGE_KS:
        out.put(f"coverage_at_{k}", share_within(abs_sorted, float(k)))
    _gaps(e, gn, seed, models, out, no_fit)
    for p in YEARS_FOR:
        # smallest k with CS(k) >= p: the ceil(p*n)-th smallest |e| (inverted-CDF quantile)
        out.put(f"years_for_{p}", np.quantile(abs_sorted, p / 100.0, method="inverted_cdf"))
    for name in ("normal", "laplace", "gennorm", *CENTRED):
        for p in YEARS_FOR:
            value = models[name].quantile(p / 100.0)
            out.put(f"years_for_{p}_{name}", value, _gn_note(name, no_fit))
    return out


def _gaps(
    e: np.ndarray,
    gn: GennormFit,
    seed: int,
    models: dict[str, AbsModel],
    out: MetricSet,
    no_fit: str | None,
) -> None:
    """cs_gap_<model>. On a lattice (integer ages) the observed curve jumps by the share of
    cases exactly k years off at every whole k (11 % at k = 0 for integer-rounded N(0, 3)
    errors), a gap no continuous model can close: the gaps then compare the models with the
    dequantized residuals (:func:`~agelab.metrics.gennorm.dequantize`, the same jitter as the
    shape statistics), so that they measure shape, not discreteness."""
    x, step = dequantize(e, seed)
    if step > 0:
        models = theory_models(x, gn)
    abs_sorted = np.sort(np.abs(x))
    for name, model in models.items():
        note = _gn_note(name, no_fit)
        if step > 0 and note is None:
            note = f"residuals on a {step:g}-year lattice: measured on dequantized residuals"
        out.put(f"cs_gap_{name}", _sup_gap(abs_sorted, model), note)


def _gn_note(name: str, no_fit: str | None) -> str | None:
    return no_fit if name.startswith("gennorm") else None

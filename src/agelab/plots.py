"""Diagnostic figures for age-regression residuals (matplotlib, no torch, no pyplot state).

Every function builds a :class:`matplotlib.figure.Figure` directly (not through ``pyplot``), so
nothing is registered with a GUI backend or leaks into global state; render it with
:func:`save_png` (which frees it) or ``fig.savefig`` / ``mlflow.log_figure``.

Figures (residual = prediction - truth, years):

* :func:`qq_plot` -- residual quantiles against a fitted normal, Laplace and generalized
  normal (GN, the fitted shape beta);
* :func:`residual_histogram` -- histogram with the three maximum-likelihood densities;
* :func:`cs_curve_plot` -- observed cumulative score CS(k) vs the curves predicted from the
  MAE (normal, Laplace, GN of the fitted beta), from N(bias, sd), and the GN curve centred
  on the fitted location when the bias moves it;
* :func:`coverage_vs_beta_figure` -- across runs: observed share within the MAE against the
  fitted beta, with the theoretical curve and the normal / Laplace points;
* :func:`residual_vs_age` -- residual against true age, binned means and the conformal band;
* :func:`pred_vs_true` -- predicted against true age with the identity line;
* :func:`first_layer_filters` -- a grid of first-layer convolution kernels from a numpy
  ``[out, in, kh, kw]`` array;
* :func:`figures_for` -- all of the above for one :class:`agelab.metrics.Diagnostics`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from scipy import special, stats

from agelab.metrics import ConformalInterval, Diagnostics
from agelab.metrics.checks import check_pair, check_residuals, is_constant, quiet_ctx
from agelab.metrics.coverage import (
    LAPLACE_CS_AT_MAE,
    NORMAL_CS_AT_MAE,
    share_within,
    theory_models,
)
from agelab.metrics.gennorm import GennormFit, coverage_at_mae_for_beta, fit_gennorm

__all__ = [
    "coverage_vs_beta_figure",
    "cs_curve_plot",
    "figures_for",
    "first_layer_filters",
    "pred_vs_true",
    "qq_plot",
    "residual_histogram",
    "residual_vs_age",
    "save_png",
]

COLORS = {
    "observed": "black",
    "normal": "tab:blue",
    "laplace": "tab:red",
    "normal_fit": "tab:green",
    "gennorm": "tab:purple",
    "gennorm_centred": "tab:purple",
}
#: A GN curve centred on the fitted location is drawn when it differs from the zero-centred
#: one by more than this anywhere (for beta in [1, 2] a bias below a fifth of the MAE moves
#: it by less: 0.014 at beta = 1, 0.003 at 1.5, measured at n = 50,000).
CENTRED_SHOWN = 0.01
DPI = 100
PAD_COLOR = "#cfe0f3"  # pale blue between grey filter tiles (not a grey level)


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Indices of at most ``max_points`` of ``n`` points (seeded; all points if n is small)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def _fits(e: np.ndarray) -> tuple[float, float, float, float]:
    """ML fits: normal (mean, sd ddof=0) and Laplace (median, mean abs deviation)."""
    med = float(np.median(e))
    if is_constant(e):
        return float(e.mean()), 0.0, med, 0.0
    return float(e.mean()), float(e.std()), med, float(np.mean(np.abs(e - med)))


def _shape(e: np.ndarray, shape: GennormFit | None) -> GennormFit:
    return shape if shape is not None else fit_gennorm(e)


def qq_plot(
    residuals: object, *, max_points: int = 2000, shape: GennormFit | None = None
) -> Figure:
    """Residual quantiles vs the fitted normal, the fitted Laplace and (when there is a fit,
    n >= 20) the fitted generalized normal: one panel each.

    For large samples ``max_points`` evenly spaced quantiles are drawn instead of every point.
    ``shape``: the GN fit of these residuals (fitted here if not given).
    """
    e = check_residuals(residuals)
    mu, sd, med, b = _fits(e)
    gn = _shape(e, shape)
    m = min(e.size, max_points)
    probs = (np.arange(1, m + 1) - 0.5) / m
    sample_q = np.quantile(e, probs) if m < e.size else np.sort(e)
    theo = {
        "normal": (mu + sd * special.ndtri(probs), COLORS["normal"]),
        "Laplace": (
            stats.laplace.ppf(probs, med, b) if b > 0 else np.full(m, med),
            COLORS["laplace"],
        ),
    }
    if gn.ok:
        q = stats.gennorm.ppf(probs, gn.beta, gn.location, gn.scale)
        theo[f"GN (β = {gn.beta:.2f})"] = (q, COLORS["gennorm"])
    fig = Figure(figsize=(4.5 * len(theo), 4.2), layout="constrained")
    axes = fig.subplots(1, len(theo))
    for ax, (name, (q, color)) in zip(axes, theo.items(), strict=True):
        ax.plot(q, sample_q, ".", ms=3, color=color, label="residual quantiles")
        ax.axline((med, med), slope=1.0, color="grey", lw=1, ls="--", label="y = x")
        ax.set_xlabel(f"fitted {name.split(' (')[0]} quantile (years)")
        ax.set_ylabel("residual quantile (years)")
        ax.set_title(f"Q-Q vs {name}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("Residual Q-Q plots (residual = prediction - truth)")
    return fig


def residual_histogram(
    residuals: object, *, max_bins: int = 100, shape: GennormFit | None = None
) -> Figure:
    """Residual histogram (density) with the ML normal, Laplace and generalized-normal
    densities overlaid (the last when there is a fit, n >= 20).

    The x-range is the central 99.8 % of residuals (extreme outliers would squash the plot);
    the density is still normalised by the full sample size.
    """
    e = check_residuals(residuals)
    n = e.size
    mu, sd, med, b = _fits(e)
    lo, hi = np.quantile(e, [0.001, 0.999])
    if hi - lo <= 0:  # (near-)constant residuals
        lo, hi = float(e.min()) - 0.5, float(e.max()) + 0.5
    edges = np.histogram_bin_edges(e[(e >= lo) & (e <= hi)], bins="auto", range=(lo, hi))
    if edges.size > max_bins + 1:
        edges = np.linspace(lo, hi, max_bins + 1)
    counts, _ = np.histogram(e, bins=edges)
    density = counts / (n * np.diff(edges))
    outside = int(np.sum((e < edges[0]) | (e > edges[-1])))

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    label = "residuals" + (f" ({outside} outside the plotted range)" if outside else "")
    ax.stairs(density, edges, fill=True, color="0.75", label=label)
    if sd > 0 and b > 0:
        _densities(ax, np.linspace(edges[0], edges[-1], 400), (mu, sd, med, b), _shape(e, shape))
    else:
        ax.set_title("constant residuals: no density fit", fontsize=9)
    ax.set_xlabel("residual = prediction - truth (years)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle("Residual distribution")
    return fig


def _densities(ax, x: np.ndarray, fits: tuple[float, ...], gn: GennormFit) -> None:
    mu, sd, med, b = fits
    label = f"normal fit (mean {mu:.2f}, sd {sd:.2f})"
    ax.plot(x, stats.norm.pdf(x, mu, sd), color=COLORS["normal"], label=label)
    label = f"Laplace fit (median {med:.2f}, b {b:.2f})"
    ax.plot(x, stats.laplace.pdf(x, med, b), color=COLORS["laplace"], label=label)
    if gn.ok:
        label = f"GN fit (β {gn.beta:.2f}, location {gn.location:.2f})"
        y = stats.gennorm.pdf(x, gn.beta, gn.location, gn.scale)
        ax.plot(x, y, color=COLORS["gennorm"], ls="--", label=label)


_CURVE_LABELS = {
    "normal": "normal from MAE",
    "laplace": "Laplace from MAE",
    "normal_fit": "N(bias, sd) fit",
    "gennorm": "GN from MAE, β {beta:.2f}",
    "gennorm_centred": "GN centred on {loc:+.2f} y",
}
_CURVE_STYLES = {"normal_fit": ":", "gennorm": "--", "gennorm_centred": "-."}


def cs_curve_plot(residuals: object, *, k_max: int = 15, shape: GennormFit | None = None) -> Figure:
    """Observed CS(k) = share with |residual| <= k vs the curves the models predict: from the
    MAE (normal, Laplace, GN of the fitted beta), N(bias, sd), and the GN centred on the
    fitted location when the bias moves that curve by more than ``CENTRED_SHOWN``."""
    e = check_residuals(residuals)
    abs_sorted = np.sort(np.abs(e))
    mae = float(abs_sorted.mean())
    k = np.linspace(0.0, float(k_max), 601)
    k = np.union1d(k, abs_sorted[abs_sorted <= k_max])  # exact steps of the observed curve
    gn = _shape(e, shape)
    models = theory_models(e, gn)
    curves = {name: models[name].cdf(k) for name in _CURVE_LABELS}
    if not gn.ok:
        del curves["gennorm"], curves["gennorm_centred"]
    elif np.max(np.abs(curves["gennorm_centred"] - curves["gennorm"])) <= CENTRED_SHOWN:
        del curves["gennorm_centred"]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    observed = share_within(abs_sorted, k)
    label = f"observed (at MAE: {share_within(abs_sorted, mae):.3f})"
    ax.step(k, observed, where="post", color=COLORS["observed"], lw=1.8, label=label)
    for name, y in curves.items():
        text = _CURVE_LABELS[name].format(beta=gn.beta, loc=gn.location)
        at_mae = float(models[name].cdf(mae))
        style = _CURVE_STYLES.get(name, "-")
        ax.plot(k, y, color=COLORS[name], lw=1.2, ls=style, label=f"{text} (at MAE: {at_mae:.3f})")
    ax.axvline(mae, color="grey", lw=1, ls="--")
    ax.annotate(f"MAE = {mae:.2f}", (mae, 0.02), fontsize=8, color="grey", ha="left")
    ax.set_xlim(0, k_max)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("k (years)")
    ax.set_ylabel("share with |error| <= k")
    ax.set_title("Cumulative score: observed vs predicted from MAE")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def residual_vs_age(
    y_true: object,
    y_pred: object,
    *,
    conformal: ConformalInterval | None = None,
    n_bins: int = 10,
    max_points: int = 5000,
    seed: int = 0,
) -> Figure:
    """Residual vs true age: scatter (subsampled), binned mean and mean |residual|, and the
    global conformal band +-q (an interval pred +- q holds the truth iff |residual| <= q)."""
    t, p = check_pair(y_true, y_pred, "y_true", "y_pred")
    e = p - t
    idx = _subsample(t.size, max_points, seed)
    fig = Figure(figsize=(7, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.scatter(t[idx], e[idx], s=4, alpha=0.3, color="0.4", lw=0, label="cases")
    ax.axhline(0.0, color="black", lw=0.8)
    if not is_constant(t):
        edges = np.linspace(t.min(), t.max(), n_bins + 1)
        which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, n_bins - 1)
        counts = np.bincount(which, minlength=n_bins)
        ok = counts > 0
        centres = 0.5 * (edges[:-1] + edges[1:])[ok]
        mean_e = np.bincount(which, e, n_bins)[ok] / counts[ok]
        mean_abs = np.bincount(which, np.abs(e), n_bins)[ok] / counts[ok]
        ax.plot(centres, mean_e, "o-", color="tab:orange", label="binned mean residual (bias)")
        ax.plot(centres, mean_abs, "s--", color="tab:purple", ms=4, label="binned mean |residual|")
    if conformal is not None and math.isfinite(conformal.q):
        pct = f"{conformal.level * 100:.10g}"
        ax.axhspan(
            -conformal.q,
            conformal.q,
            color="tab:cyan",
            alpha=0.15,
            label=f"conformal {pct}% band (+-{conformal.q:.2f} y)",
        )
    ax.set_xlabel("true age (years)")
    ax.set_ylabel("residual = prediction - truth (years)")
    ax.set_title("Residual vs true age")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


def pred_vs_true(
    y_true: object, y_pred: object, *, max_points: int = 5000, seed: int = 0
) -> Figure:
    """Predicted vs true age (subsampled scatter) with the identity line."""
    t, p = check_pair(y_true, y_pred, "y_true", "y_pred")
    idx = _subsample(t.size, max_points, seed)
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(t[idx], p[idx], s=4, alpha=0.3, color="tab:blue", lw=0, label="cases")
    start = float(min(t.min(), p.min()))
    ax.axline((start, start), slope=1.0, color="black", lw=1, ls="--", label="identity")
    ax.set_xlabel("true age (years)")
    ax.set_ylabel("predicted age (years)")
    ax.set_title("Predicted vs true age")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def _normalise(kernel: np.ndarray) -> np.ndarray:
    """Scale one kernel to [0, 1] by its own min/max (constant kernels become mid-grey)."""
    lo, hi = float(kernel.min()), float(kernel.max())
    if hi - lo <= 0:
        return np.full(kernel.shape, 0.5)
    return (kernel - lo) / (hi - lo)


def first_layer_filters(
    weights: object, *, max_filters: int = 64, max_channels: int = 8, pad: int = 1
) -> Figure:
    """Grid of first-layer conv kernels from a numpy array ``[out, in, kh, kw]``.

    Each kernel (all its input channels together) is normalised to its own range. With 3 input
    channels every filter is one RGB tile; otherwise each (filter, channel) pair is a grey tile,
    one row per filter. At most ``max_filters`` filters / ``max_channels`` channels are shown.
    Pass ``layer.weight.detach().cpu().numpy()`` for a torch layer.
    """
    w = np.asarray(weights, dtype=float)
    if w.ndim != 4 or min(w.shape) < 1:
        raise ValueError(f"weights must have shape [out, in, kh, kw], got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights contain NaN or inf")
    n_out, n_in, kh, kw = w.shape
    shown = min(n_out, max_filters)
    kernels = [_normalise(w[o]) for o in range(shown)]  # [in, kh, kw] each, in [0, 1]
    rgb = n_in == 3
    n_ch = 1 if rgb else min(n_in, max_channels)
    if n_ch == 1:  # one tile per filter, in a near-square grid
        cols = math.ceil(math.sqrt(shown))
        rows = math.ceil(shown / cols)
        cells = [(*divmod(i, cols), ker if rgb else ker[0]) for i, ker in enumerate(kernels)]
    else:  # one row per filter, one column per input channel
        rows, cols = shown, n_ch
        cells = [(i, c, ker[c]) for i, ker in enumerate(kernels) for c in range(n_ch)]
    # Mosaic with NaN padding between tiles (drawn in a colour no kernel value can take).
    shape = (rows * (kh + pad) + pad, cols * (kw + pad) + pad)
    mosaic = np.full((*shape, 3) if rgb else shape, np.nan)
    for r, c, tile in cells:
        y, x = pad + r * (kh + pad), pad + c * (kw + pad)
        mosaic[y : y + kh, x : x + kw] = np.transpose(tile, (1, 2, 0)) if rgb else tile
    height = min(10.0, max(2.5, 0.5 * rows + 1.0))
    width = min(10.0, max(2.5, 0.5 * cols + 1.0))
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    if rgb:  # RGBA: padding fully transparent
        alpha = np.isfinite(mosaic[..., :1]).astype(float)
        ax.imshow(np.concatenate([np.nan_to_num(mosaic), alpha], axis=2), interpolation="nearest")
    else:
        cmap = matplotlib.colormaps["gray"].with_extremes(bad=PAD_COLOR)
        image = np.ma.masked_invalid(mosaic)
        ax.imshow(image, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    detail = f"{shown} of {n_out} filters, {n_in} input channel(s), {kh}x{kw}"
    if not rgb and n_in > max_channels:
        detail += f", first {max_channels} channels"
    ax.set_title(f"first-layer filters\n{detail}", fontsize=9)
    return fig


def _beta_arrays(*arrays: object) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=float).reshape(-1) for a in arrays]
    if len({a.size for a in out}) != 1:
        sizes = ", ".join(str(a.size) for a in out)
        raise ValueError(f"beta, beta_low, beta_high and coverage differ in length ({sizes})")
    return out


def _draw_runs(ax, values: tuple[np.ndarray, ...], groups: np.ndarray, keep: np.ndarray) -> None:
    """One colour per label: points at (beta, coverage) with beta's interval as an x bar."""
    beta, low, high, cov = values
    cmap = matplotlib.colormaps["tab10"]
    for i, name in enumerate(dict.fromkeys(groups[keep])):
        sel = keep & (groups == name)
        err = np.abs(np.vstack([beta[sel] - low[sel], high[sel] - beta[sel]]))
        ax.errorbar(
            beta[sel],
            cov[sel],
            xerr=np.where(np.isfinite(err), err, 0.0),
            fmt="o",
            ms=4,
            lw=0.8,
            capsize=2,
            color=cmap(i % 10),
            alpha=0.8,
            label=f"{name} ({int(sel.sum())})",
        )


def _mark_story_points(ax) -> None:
    """The rule of thumb's two points: normal errors 57.5 %, Laplace errors 63.2 %."""
    points = (
        (2.0, NORMAL_CS_AT_MAE, "normal", COLORS["normal"]),
        (1.0, LAPLACE_CS_AT_MAE, "Laplace", COLORS["laplace"]),
    )
    for x, y, name, color in points:
        ax.plot([x], [y], marker="*", ms=14, color=color, mec="black", mew=0.6, ls="none")
        text = f"{name}: β = {x:g}, {y:.1%}"
        ax.annotate(
            text, (x, y), xytext=(8, 6), textcoords="offset points", fontsize=8, color=color
        )


def coverage_vs_beta_figure(
    beta: np.ndarray,
    beta_low: np.ndarray,
    beta_high: np.ndarray,
    coverage: np.ndarray,
    labels: list[str] | None = None,
) -> Figure:
    """Across runs: observed share within the MAE against the fitted shape beta (with its
    interval as a horizontal bar), the curve centred GN errors predict
    (:func:`~agelab.metrics.coverage_at_mae_for_beta`) and the normal (beta = 2, 57.5 %) and
    Laplace (beta = 1, 63.2 %) points marked. ``labels`` (one per run, e.g. the shape label)
    colour the points. Runs with a NaN beta or coverage are left out (counted in the title).
    """
    beta, low, high, cov = _beta_arrays(beta, beta_low, beta_high, coverage)
    if labels is not None and len(labels) != beta.size:
        raise ValueError(f"labels has {len(labels)} entries for {beta.size} runs")
    keep = np.isfinite(beta) & np.isfinite(cov)
    lo_x = min(0.5, float(np.min(low[keep & np.isfinite(low)], initial=0.5)) * 0.9)
    hi_x = max(3.0, float(np.max(high[keep & np.isfinite(high)], initial=3.0)) * 1.1)
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    grid = np.geomspace(lo_x, hi_x, 400)
    curve_label = "centred GN errors: P(|e| <= MAE)"
    ax.plot(grid, coverage_at_mae_for_beta(grid), color="0.3", lw=1.2, label=curve_label)
    groups = ["runs"] * beta.size if labels is None else [str(v) for v in labels]
    _draw_runs(ax, (beta, low, high, cov), np.array(groups), keep)
    _mark_story_points(ax)
    ax.set_xscale("log")
    ticks = [t for t in (0.5, 0.7, 1, 1.5, 2, 3, 5, 10, 20) if lo_x <= t <= hi_x]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())  # no "6x10^-1" labels
    ax.set_xlim(lo_x, hi_x)
    ax.set_xlabel("fitted shape β (95 % interval): < 1 heavier tails, 1 Laplace, 2 normal")
    ax.set_ylabel("observed share within the MAE")
    left_out = int((~keep).sum())
    extra = f" ({left_out} run(s) without a fit left out)" if left_out else ""
    ax.set_title(f"Coverage at the MAE vs residual shape{extra}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, which="both")
    return fig


def figures_for(
    diagnostics: Diagnostics,
    y_true: object,
    y_pred: object,
    *,
    first_layer_weights: object = None,
    conformal_level: float = 0.9,
    seed: int = 0,
) -> dict[str, Figure]:
    """All diagnostic figures for one evaluated run, keyed by a file-name-friendly name.

    ``y_true``/``y_pred`` are the test arrays passed to :func:`agelab.metrics.evaluate`;
    the conformal band uses ``diagnostics.conformal[conformal_level]`` when present.
    """
    t, p = check_pair(y_true, y_pred, "y_true", "y_pred")
    e = p - t
    conformal = diagnostics.conformal.get(conformal_level)
    if conformal is None and diagnostics.conformal:  # closest available level
        conformal = diagnostics.conformal[
            min(diagnostics.conformal, key=lambda lv: abs(lv - conformal_level))
        ]
    with quiet_ctx():  # scipy ppf/pdf at the extremes must not warn
        shape = diagnostics.shape if diagnostics.shape is not None else fit_gennorm(e, seed)
        figs = {
            "qq": qq_plot(e, shape=shape),
            "residual_hist": residual_histogram(e, shape=shape),
            "cs_curve": cs_curve_plot(e, k_max=diagnostics.k_max, shape=shape),
            "residual_vs_age": residual_vs_age(t, p, conformal=conformal, seed=seed),
            "pred_vs_true": pred_vs_true(t, p, seed=seed),
        }
    figs["qq"].suptitle(f"Residual Q-Q plots -- verdict: {diagnostics.verdict}")
    if first_layer_weights is not None:
        figs["first_layer_filters"] = first_layer_filters(first_layer_weights)
    return figs


def save_png(fig: Figure, path: str | Path, *, dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG (creating parent folders), then close/free it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    if "matplotlib.pyplot" in sys.modules:  # only matters for figures made through pyplot
        sys.modules["matplotlib.pyplot"].close(fig)
    fig.clear()
    return path

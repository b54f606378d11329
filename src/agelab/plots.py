"""Diagnostic figures for age-regression residuals (matplotlib, no torch, no pyplot state).

Every function builds a :class:`matplotlib.figure.Figure` directly (not through ``pyplot``), so
nothing is registered with a GUI backend or leaks into global state; render it with
:func:`save_png` (which frees it) or ``fig.savefig`` / ``mlflow.log_figure``.

Figures (residual = prediction - truth, years):

* :func:`qq_plot` -- residual quantiles against a fitted normal and a fitted Laplace;
* :func:`residual_histogram` -- histogram with both maximum-likelihood densities;
* :func:`cs_curve_plot` -- observed cumulative score CS(k) vs the curves predicted from the
  MAE (normal, Laplace) and from N(bias, sd);
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
from scipy import special, stats

from agelab.metrics import ConformalInterval, Diagnostics
from agelab.metrics.checks import check_pair, check_residuals, is_constant, quiet_ctx
from agelab.metrics.coverage import share_within, theory_models

__all__ = [
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
}
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


def qq_plot(residuals: object, *, max_points: int = 2000) -> Figure:
    """Two panels: residual quantiles vs the fitted normal and vs the fitted Laplace.

    For large samples ``max_points`` evenly spaced quantiles are drawn instead of every point.
    """
    e = check_residuals(residuals)
    mu, sd, med, b = _fits(e)
    m = min(e.size, max_points)
    probs = (np.arange(1, m + 1) - 0.5) / m
    sample_q = np.quantile(e, probs) if m < e.size else np.sort(e)
    theo = {
        "normal": mu + sd * special.ndtri(probs),
        "Laplace": stats.laplace.ppf(probs, med, b) if b > 0 else np.full(m, med),
    }
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (name, q) in zip(axes, theo.items(), strict=True):
        color = COLORS["normal"] if name == "normal" else COLORS["laplace"]
        ax.plot(q, sample_q, ".", ms=3, color=color, label="residual quantiles")
        ax.axline((med, med), slope=1.0, color="grey", lw=1, ls="--", label="y = x")
        ax.set_xlabel(f"fitted {name} quantile (years)")
        ax.set_ylabel("residual quantile (years)")
        ax.set_title(f"Q-Q vs {name}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("Residual Q-Q plots (residual = prediction - truth)")
    return fig


def residual_histogram(residuals: object, *, max_bins: int = 100) -> Figure:
    """Residual histogram (density) with the ML normal and Laplace densities overlaid.

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
        x = np.linspace(edges[0], edges[-1], 400)
        ax.plot(
            x,
            stats.norm.pdf(x, mu, sd),
            color=COLORS["normal"],
            label=f"normal fit (mean {mu:.2f}, sd {sd:.2f})",
        )
        ax.plot(
            x,
            stats.laplace.pdf(x, med, b),
            color=COLORS["laplace"],
            label=f"Laplace fit (median {med:.2f}, b {b:.2f})",
        )
    else:
        ax.set_title("constant residuals: no density fit", fontsize=9)
    ax.set_xlabel("residual = prediction - truth (years)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle("Residual distribution")
    return fig


def cs_curve_plot(residuals: object, *, k_max: int = 15) -> Figure:
    """Observed CS(k) = share with |residual| <= k vs the curves predicted by the models."""
    e = check_residuals(residuals)
    abs_sorted = np.sort(np.abs(e))
    mae = float(abs_sorted.mean())
    k = np.linspace(0.0, float(k_max), 601)
    k = np.union1d(k, abs_sorted[abs_sorted <= k_max])  # exact steps of the observed curve
    models = theory_models(e)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.step(
        k,
        share_within(abs_sorted, k),
        where="post",
        color=COLORS["observed"],
        lw=1.8,
        label=f"observed (at MAE: {share_within(abs_sorted, mae):.3f})",
    )
    labels = {
        "normal": "normal from MAE",
        "laplace": "Laplace from MAE",
        "normal_fit": "N(bias, sd) fit",
    }
    for name, model in models.items():
        ax.plot(
            k,
            model.cdf(k),
            color=COLORS[name],
            lw=1.2,
            ls="-" if name != "normal_fit" else ":",
            label=f"{labels[name]} (at MAE: {float(model.cdf(mae)):.3f})",
        )
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
        figs = {
            "qq": qq_plot(e),
            "residual_hist": residual_histogram(e),
            "cs_curve": cs_curve_plot(e, k_max=diagnostics.k_max),
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

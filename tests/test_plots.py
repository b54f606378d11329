"""Tests for agelab.plots: every figure renders to PNG without warnings, also on edge cases."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from agelab import metrics as M
from agelab import plots
from agelab.metrics import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _render(fig: Figure) -> bytes:
    """Full PNG render (slow on a busy machine: ~0.3 s per figure)."""
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    data = buf.getvalue()
    assert data.startswith(PNG_MAGIC)
    return data


def _draw(fig: Figure) -> None:
    """Layout + draw without rasterising: where matplotlib warnings come from, at 2/3 the cost.
    Every figure type is also rendered to a real PNG in test_figures_for_with_weights_and_save_png.
    """
    assert isinstance(fig, Figure)
    fig.draw_without_rendering()


def _run(seed: int = 0, n: int = 600):
    rng = np.random.default_rng(seed)
    t = rng.uniform(1, 90, 2 * n)
    p = t + rng.laplace(0, 3, t.size)
    return t[:n], p[:n], evaluate(t[:n], p[:n], t[n:], p[n:])


CASES = {
    "constant_residuals": lambda: (np.linspace(5, 80, 40), np.linspace(5, 80, 40) + 2.0),
    "perfect": lambda: (np.linspace(5, 80, 40), np.linspace(5, 80, 40)),
    "constant_truth": lambda: (np.full(25, 30.0), np.random.default_rng(1).normal(30, 4, 25)),
    "three_points": lambda: (np.array([10.0, 20.0, 30.0]), np.array([12.0, 19.0, 35.0])),
    "outliers": lambda: (
        np.linspace(1, 90, 500),
        np.linspace(1, 90, 500) + np.random.default_rng(2).standard_cauchy(500),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_all_figures_render_without_warnings(case):
    t, p = CASES[case]()
    d = evaluate(t, p, t, p)
    figs = plots.figures_for(d, t, p)
    assert set(figs) == {"qq", "residual_hist", "cs_curve", "residual_vs_age", "pred_vs_true"}
    for fig in figs.values():
        _draw(fig)


def test_individual_figures():
    t, p, d = _run()
    e = p - t
    qq = plots.qq_plot(e, shape=d.shape)
    titles = [ax.get_title() for ax in qq.axes]
    assert titles == ["Q-Q vs normal", "Q-Q vs Laplace", f"Q-Q vs GN (β = {d.shape.beta:.2f})"]
    hist = plots.residual_histogram(e)
    assert len(hist.axes[0].lines) == 3  # normal, Laplace and GN densities
    assert hist.axes[0].get_legend().texts[3].get_text().startswith(f"GN fit (β {d.shape.beta:.2f}")
    cs = plots.cs_curve_plot(e, k_max=12)
    labels = [t.get_text() for t in cs.axes[0].get_legend().texts]
    assert len(labels) == 5  # observed, normal, Laplace, N(bias, sd), GN; no bias: no centred
    assert labels[4].startswith(f"GN from MAE, β {d.shape.beta:.2f}")
    assert cs.axes[0].get_xlim() == (0.0, 12.0)
    band = plots.residual_vs_age(t, p, conformal=d.conformal[0.9])
    assert any("conformal 90% band" in text.get_text() for text in band.axes[0].get_legend().texts)
    pvt = plots.pred_vs_true(t, p)
    for fig in (qq, hist, cs, band, pvt):
        _draw(fig)


def test_small_samples_have_no_gn_panel():
    e = np.random.default_rng(0).normal(size=12)  # n < 20: no GN fit
    assert [ax.get_title() for ax in plots.qq_plot(e).axes] == ["Q-Q vs normal", "Q-Q vs Laplace"]
    assert len(plots.residual_histogram(e).axes[0].lines) == 2


def test_cs_curve_shows_the_centred_gn_curve_for_a_biased_run():
    e = 3.0 + np.random.default_rng(1).laplace(0, 3, 3000)  # bias 3 years
    cs = plots.cs_curve_plot(e)
    labels = [t.get_text() for t in cs.axes[0].get_legend().texts]
    centred = [label for label in labels if label.startswith("GN centred on +")]
    assert len(centred) == 1, labels
    assert float(centred[0].split("+")[1].split(" ")[0]) == pytest.approx(3.0, abs=0.2)
    # centred, the GN predicts the observed share within the MAE; from 0 it is 2.5 points off
    observed = float(labels[0].split(": ")[1].rstrip(")"))
    assert float(centred[0].split(": ")[1].rstrip(")")) == pytest.approx(observed, abs=0.01)
    _draw(cs)


def test_coverage_vs_beta_figure():
    rng = np.random.default_rng(0)
    beta = rng.uniform(0.8, 2.2, 12)
    beta[3] = np.nan  # a run without a fit
    cov = M.coverage_at_mae_for_beta(np.nan_to_num(beta, nan=1.0)) + rng.normal(0, 0.01, 12)
    labels = ["laplace"] * 6 + ["normal"] * 6
    fig = plots.coverage_vs_beta_figure(beta, beta - 0.1, beta + 0.15, cov, labels)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert "1 run(s) without a fit left out" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().texts]
    assert legend == ["centred GN errors: P(|e| <= MAE)", "laplace (5)", "normal (6)"]
    curve = ax.lines[0]
    x, y = curve.get_xdata(), curve.get_ydata()
    assert np.interp(2.0, x, y) == pytest.approx(M.NORMAL_CS_AT_MAE, abs=1e-3)
    assert np.interp(1.0, x, y) == pytest.approx(M.LAPLACE_CS_AT_MAE, abs=1e-3)
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["normal: β = 2, 57.5%", "Laplace: β = 1, 63.2%"]
    _render(fig)
    plain = plots.coverage_vs_beta_figure([1.0], [0.9], [1.1], [0.63])  # no labels
    assert [t.get_text() for t in plain.axes[0].get_legend().texts][1] == "runs (1)"
    with pytest.raises(ValueError, match="differ in length"):
        plots.coverage_vs_beta_figure([1.0, 2.0], [0.9], [1.1], [0.63])
    with pytest.raises(ValueError, match="labels has 2 entries for 1 runs"):
        plots.coverage_vs_beta_figure([1.0], [0.9], [1.1], [0.63], ["a", "b"])


def test_large_inputs_are_subsampled_quickly():
    rng = np.random.default_rng(0)
    t = rng.uniform(1, 90, 200_000)
    p = t + rng.normal(0, 4, t.size)
    fig = plots.qq_plot(p - t, max_points=500)
    assert len(fig.axes[0].lines[0].get_xdata()) == 500
    fig = plots.pred_vs_true(t, p, max_points=1000)
    assert fig.axes[0].collections[0].get_offsets().shape[0] == 1000


@pytest.mark.parametrize(
    ("shape", "expect"),
    [((16, 3, 7, 7), "16 of 16 filters, 3 input"), ((100, 1, 5, 5), "64 of 100 filters")],
)
def test_first_layer_filters(shape, expect):
    w = np.random.default_rng(0).normal(size=shape)
    w[0] = 0.25  # a constant kernel must not divide by zero
    fig = plots.first_layer_filters(w)
    title = fig.axes[0].get_title()
    assert title.startswith("first-layer filters") and expect in title
    image = fig.axes[0].get_images()[0].get_array()
    if shape[1] == 3:
        assert image.shape[-1] == 4  # RGBA
    assert float(np.nanmax(image)) <= 1.0 and float(np.nanmin(image)) >= 0.0
    _render(fig)


def test_first_layer_filters_grey_channels():
    w = np.random.default_rng(0).normal(size=(4, 12, 3, 3))
    fig = plots.first_layer_filters(w, max_channels=8)
    assert "first 8 channels" in fig.axes[0].get_title()
    image = fig.axes[0].get_images()[0].get_array()
    assert image.shape == (4 * 4 + 1, 8 * 4 + 1)  # rows = filters, cols = channels, 1-px pad
    _render(fig)


def test_first_layer_filters_normalises_each_kernel():
    w = np.stack([np.arange(9.0).reshape(1, 3, 3), 1000 * np.arange(9.0).reshape(1, 3, 3)])
    image = plots.first_layer_filters(w, pad=0).axes[0].get_images()[0].get_array()
    assert np.allclose(image[:, :3], image[:, 3:])  # same pattern, different scale -> same tile


@pytest.mark.parametrize("bad", [np.zeros((3, 3, 3)), np.full((2, 3, 3, 3), np.nan)])
def test_first_layer_filters_rejects_bad_weights(bad):
    with pytest.raises(ValueError, match="weights"):
        plots.first_layer_filters(bad)


def test_figures_for_with_weights_and_save_png(tmp_path: Path):
    t, p, d = _run()
    w = np.random.default_rng(0).normal(size=(8, 3, 5, 5))
    figs = plots.figures_for(d, t, p, first_layer_weights=w)
    assert "first_layer_filters" in figs
    assert "verdict: laplace" in figs["qq"].get_suptitle()
    for name, fig in figs.items():
        path = plots.save_png(fig, tmp_path / "sub" / f"{name}.png")
        assert path.read_bytes().startswith(PNG_MAGIC)
        assert path.stat().st_size < 300_000
        assert not fig.axes  # freed


def test_figures_for_without_calibration():
    t, p, _ = _run()
    d = evaluate(t, p)
    figs = plots.figures_for(d, t, p)
    _draw(figs["residual_vs_age"])


def test_no_pyplot_or_torch_imports():
    source = Path(plots.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(torch|matplotlib\.pyplot)\b", source, re.M)
    assert not re.search(r"^\s*from\s+matplotlib\s+import\s+.*pyplot", source, re.M)

"""Regenerate the figures of docs/diagnostics.md: docs/img/diagnostics_example.png and
docs/img/coverage_vs_beta.png.

    PYTHONPATH=src .venv/bin/python docs/make_diagnostics_figure.py

diagnostics_example.png -- a simulated, seeded run: true ages uniform on 1-90, prediction errors
Laplace with a scale that grows with age (as real age models do), a calibration and a test split
of 2,000 each. Four of the standard diagnostic figures are tiled into one PNG (kept under 300 KB
by a palette PNG).

coverage_vs_beta.png -- 40 simulated runs of 2,000 test faces each, integer true ages and
real-valued predictions: generalized-normal errors with beta from 0.7 to 3 (5 of them with a
bias of 2 years), Student-t(3) and centred gamma(2) errors; each run's observed share within
the MAE against its fitted beta, coloured by its label
(:func:`agelab.plots.coverage_vs_beta_figure`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import stats

from agelab.metrics import evaluate
from agelab.plots import coverage_vs_beta_figure, figures_for

OUT = Path(__file__).resolve().parent / "img" / "diagnostics_example.png"
OUT_BETA = Path(__file__).resolve().parent / "img" / "coverage_vs_beta.png"
ROWS = (("cs_curve", "residual_hist"), ("qq", "residual_vs_age"))
DPI = 80


def simulate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    truth = rng.uniform(1.0, 90.0, n)
    return truth, truth + rng.laplace(0.0, 2.5 * (1.0 + truth / 60.0))


def _errors(i: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Run i's errors: mostly GN with beta spread over 0.7-3, a few t(3) and skewed ones."""
    if i % 10 == 8:
        return 2.0 * rng.standard_t(3, n)
    if i % 10 == 9:
        return rng.gamma(2.0, 2.0, n) - 4.0
    beta = float(np.geomspace(0.7, 3.0, 40)[i])
    bias = 2.0 if i % 8 == 1 else 0.0
    return bias + stats.gennorm.rvs(beta, scale=4.0, size=n, random_state=rng)


def coverage_vs_beta(rng: np.random.Generator) -> None:
    rows = []
    for i in range(40):
        truth = np.round(rng.uniform(1.0, 90.0, 2000))
        pred = truth + _errors(i, truth.size, rng)
        d = evaluate(truth, pred, seed=i)
        s = d.scalars
        keys = ("shape_beta", "shape_beta_low", "shape_beta_high", "coverage_at_mae")
        rows.append((*(s[k] for k in keys), d.verdict))
    beta, low, high, cov, labels = zip(*rows, strict=True)
    arrays = (np.array(v) for v in (beta, low, high, cov))
    fig = coverage_vs_beta_figure(*arrays, labels=list(labels))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI + 10)
    image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(OUT_BETA, optimize=True)
    print(f"wrote {OUT_BETA} ({OUT_BETA.stat().st_size / 1024:.0f} KB)")


def main() -> None:
    coverage_vs_beta(np.random.default_rng(15))
    rng = np.random.default_rng(2024)
    t_cal, p_cal = simulate(2000, rng)
    t_test, p_test = simulate(2000, rng)
    diag = evaluate(t_test, p_test, t_cal, p_cal)
    figs = figures_for(diag, t_test, p_test)

    rows = []
    for names in ROWS:
        images = []
        for name in names:
            buf = io.BytesIO()
            figs[name].savefig(buf, format="png", dpi=DPI)
            images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        rows.append(images)
    # panels side by side, rows stacked and centred, white background
    row_sizes = [(sum(im.width for im in r), max(im.height for im in r)) for r in rows]
    width = max(w for w, _ in row_sizes)
    sheet = Image.new("RGB", (width, sum(h for _, h in row_sizes)), "white")
    y = 0
    for images, (row_w, row_h) in zip(rows, row_sizes, strict=True):
        x = (width - row_w) // 2
        for im in images:
            sheet.paste(im, (x, y))
            x += im.width
        y += row_h
    OUT.parent.mkdir(parents=True, exist_ok=True)
    sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(OUT, optimize=True)
    print(diag.summary())
    print(f"verdict reason: {diag.verdict_reason}")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()

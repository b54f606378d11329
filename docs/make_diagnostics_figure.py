"""Regenerate docs/img/diagnostics_example.png (the figure in docs/diagnostics.md).

    PYTHONPATH=src .venv/bin/python docs/make_diagnostics_figure.py

Simulated, seeded run: true ages uniform on 1-90, prediction errors Laplace with a scale that
grows with age (as real age models do), a calibration and a test split of 2,000 each. Four of
the standard diagnostic figures are tiled into one PNG (kept under 300 KB by a palette PNG).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from agelab.metrics import evaluate
from agelab.plots import figures_for

OUT = Path(__file__).resolve().parent / "img" / "diagnostics_example.png"
ROWS = (("cs_curve", "residual_hist"), ("qq", "residual_vs_age"))
DPI = 80


def simulate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    truth = rng.uniform(1.0, 90.0, n)
    return truth, truth + rng.laplace(0.0, 2.5 * (1.0 + truth / 60.0))


def main() -> None:
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

"""A contact sheet of synthetic faces (``agelab data preview``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image

    from agelab.data.synth.generate import SynthFaces


def contact_sheet(faces: SynthFaces, *, rows: int = 8, cols: int = 12, scale: int = 1) -> Image:
    """A grid of faces, young (top left) to old (bottom right), each tile captioned with
    its true age (and the noisy label in brackets where it differs by ≥ 0.5 year).

    Tiles are picked at evenly spaced age ranks, so every row spans an age band.
    Returns a ``PIL.Image.Image``.
    """
    from PIL import Image, ImageDraw, ImageFont

    n = len(faces.ages)
    if n == 0:
        raise ValueError("no faces to show")
    k = min(rows * cols, n)
    cols = min(cols, k)
    rows = math.ceil(k / cols)
    order = np.argsort(faces.true_ages, kind="stable")
    pick = order[np.round(np.linspace(0, n - 1, k)).astype(int)]
    h, w = faces.images.shape[2] * scale, faces.images.shape[3] * scale
    font = ImageFont.load_default()
    cap = 12
    sheet = Image.new("RGB", (cols * w, rows * (h + cap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, i in enumerate(pick):
        r, c = divmod(j, cols)
        tile = Image.fromarray(np.ascontiguousarray(faces.images[i].transpose(1, 2, 0)))
        if scale != 1:
            tile = tile.resize((w, h), Image.NEAREST)
        x0, y0 = c * w, r * (h + cap)
        sheet.paste(tile, (x0, y0))
        text = f"{faces.true_ages[i]:.0f}"
        if abs(float(faces.ages[i]) - float(faces.true_ages[i])) >= 0.5:
            text += f" ({faces.ages[i]:.0f})"
        draw.text((x0 + 2, y0 + h), text, fill=(0, 0, 0), font=font)
    return sheet

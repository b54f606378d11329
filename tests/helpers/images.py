"""Small random images written as real files (JPEG/PNG), for the data tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size=(24, 20), *, seed: int = 0, fmt: str | None = None) -> Path:
    """A ``size`` (width, height) RGB noise image at ``path`` (PNG for .png, else JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt or ("PNG" if path.suffix == ".png" else "JPEG"))
    return path


def jpeg_bytes(size=(24, 20)) -> bytes:
    """The bytes of a small valid JPEG (to write under odd names or truncate)."""
    buf = io.BytesIO()
    arr = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()

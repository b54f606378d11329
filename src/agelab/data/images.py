"""Decode face images once: open, check, orient, convert to RGB, crop, resize → uint8 [3,H,W].

Every image of a real dataset goes through :func:`decode_image` exactly once (the result is
cached, see :mod:`agelab.data.cache`). The steps, in order:

1. ``Image.open`` + ``.load()`` — ``load()`` forces the full decode, which is what catches a
   truncated file (with ``ImageFile.LOAD_TRUNCATED_IMAGES`` False, PIL raises instead of
   padding the missing part with grey).
2. ``ImageOps.exif_transpose`` — phone photos are often stored sideways with an EXIF
   orientation tag.
3. Convert to RGB: grayscale, 16-bit/float grayscale, CMYK, palette and images with alpha are
   converted (alpha is composited over mid-grey), never rejected.
4. Crop: to the face box ``(x, y, w, h)`` when the manifest has one (widened to a square
   around the box centre and shifted to stay inside the image, so faces are not stretched),
   else a centred square of ``center_crop`` × the shorter side.
5. Resize to ``image_size`` × ``image_size`` with Lanczos (antialiased when shrinking).

Problems are raised as :class:`ImageProblem` with one of the reason constants below; the
caller decides (``on_bad``) whether that stops the load or skips the row.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Reasons an image file is rejected while decoding (re-exported by agelab.data.sources).
NOT_IMAGE = "not an image"
TRUNCATED_IMAGE = "truncated image"
CORRUPT_IMAGE = "unreadable or corrupt image"
BAD_BOX = "bad face box"

# Bumped whenever decoding output changes for the same input (part of the cache key).
DECODER_VERSION = 1

_GREY_BACKGROUND = (128, 128, 128)


class ImageProblem(Exception):
    """An image cannot be used; ``reason`` is one of the reason constants.

    ``detail`` does not repeat the file name (callers say where); ``str()`` does.
    """

    def __init__(self, reason: str, detail: str, file: str | Path | None = None):
        super().__init__(f"{file}: {reason}: {detail}" if file else f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.file = file


@dataclass(frozen=True)
class Box:
    """A face box in pixels of the upright (EXIF-rotated) original image."""

    x: float
    y: float
    w: float
    h: float


def _ensure_strict_truncation() -> None:
    # Some libraries flip this global to True to "tolerate" broken files; we must not
    # accept half-decoded images silently, so force it back and say so.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was True; agelab sets it to False so that "
            "truncated images are reported instead of padded with grey",
            RuntimeWarning,
            stacklevel=3,
        )
        ImageFile.LOAD_TRUNCATED_IMAGES = False


_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _sniff(file: str | Path) -> str | None:
    """The image format a file's first bytes announce, if any."""
    try:
        with open(file, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for sig, kind in _SIGNATURES.items() if head.startswith(sig)), None)


def open_image(file: str | Path) -> Image.Image:
    """Open and fully decode an image, raising :class:`ImageProblem` for bad files."""
    _ensure_strict_truncation()
    try:
        img = Image.open(file)
        img.load()
    except UnidentifiedImageError:
        kind = _sniff(file)
        if kind:  # a known image signature, but PIL cannot parse the rest
            raise ImageProblem(
                CORRUPT_IMAGE, f"starts like a {kind} but its header is damaged", file
            ) from None
        raise ImageProblem(NOT_IMAGE, "not in an image format PIL can read", file) from None
    except Image.DecompressionBombError as exc:
        raise ImageProblem(CORRUPT_IMAGE, str(exc), file) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        if "truncated" in text.lower() or isinstance(exc, EOFError):
            raise ImageProblem(TRUNCATED_IMAGE, text or "the data ends early", file) from None
        raise ImageProblem(CORRUPT_IMAGE, text or type(exc).__name__, file) from None
    # Rotate/flip upright per the EXIF orientation tag (in place keeps img.format); a broken
    # EXIF block must not reject an otherwise good image.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB (alpha composited over mid-grey)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        # 16-bit / 32-bit / float grayscale: PIL's convert("L") clips at 255, so rescale the
        # actual value range to 0..255 instead.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.nan_to_num(scaled).round().astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_GREY_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def crop_box(size: tuple[int, int], center_crop: float, box: Box | None) -> tuple[int, ...]:
    """The square (left, top, right, bottom) region to keep of an image of ``size``."""
    width, height = size
    if box is None:
        side = max(1, round(min(width, height) * center_crop))
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side
    if not (box.w > 0 and box.h > 0) or not all(map(math.isfinite, (box.x, box.y, box.w, box.h))):
        raise ImageProblem(BAD_BOX, f"box {box} needs a positive width and height")
    # The box must overlap the image; a box entirely outside means wrong coordinates.
    if box.x >= width or box.y >= height or box.x + box.w <= 0 or box.y + box.h <= 0:
        raise ImageProblem(BAD_BOX, f"box {box} lies outside the {width}x{height} image")
    side = min(max(box.w, box.h), width, height)
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    left = min(max(cx - side / 2, 0.0), width - side)
    top = min(max(cy - side / 2, 0.0), height - side)
    side_px = max(1, round(side))
    left_px, top_px = round(left), round(top)
    left_px = min(left_px, width - side_px)
    top_px = min(top_px, height - side_px)
    return left_px, top_px, left_px + side_px, top_px + side_px


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 [3, S, S]
    original_size: tuple[int, int]  # (width, height) after EXIF rotation
    original_mode: str


def decode_image(
    file: str | Path, image_size: int, center_crop: float = 1.0, box: Box | None = None
) -> Decoded:
    """Decode one file into uint8 [3, image_size, image_size] (see the module docstring)."""
    img = open_image(file)
    mode, size = img.mode, img.size
    rgb = to_rgb(img)
    region = crop_box(size, center_crop, box)
    out = rgb.resize((image_size, image_size), Image.Resampling.LANCZOS, box=region)
    pixels = np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)
    return Decoded(np.ascontiguousarray(pixels), size, mode)


def decode_workers() -> int:
    """Threads for decoding (PIL releases the GIL while decoding and resizing)."""
    env = os.environ.get("AGELAB_DECODE_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class DecodeResult:
    images: np.ndarray  # uint8 [n_ok, 3, S, S], rows in input order
    ok: np.ndarray  # bool [n_input]: which inputs decoded
    problems: dict[int, ImageProblem]  # input index → problem
    sizes: list[tuple[int, int] | None]  # original (W, H) per input, None when bad
    modes: list[str | None]


def decode_many(
    files: Sequence[str | Path],
    image_size: int,
    center_crop: float = 1.0,
    boxes: Sequence[Box | None] | None = None,
    *,
    stop_at_first: bool = False,
    progress: bool = False,
    desc: str = "decoding images",
    on_problem: Callable[[int, ImageProblem], None] | None = None,
) -> DecodeResult:
    """Decode many files with a thread pool.

    With ``stop_at_first`` the first problem (in input order) is raised as
    :class:`ImageProblem` with ``.index`` set; otherwise problems are collected.
    """
    from tqdm.auto import tqdm

    n = len(files)
    boxes = list(boxes) if boxes is not None else [None] * n
    buffer = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    problems: dict[int, ImageProblem] = {}
    sizes: list[tuple[int, int] | None] = [None] * n
    modes: list[str | None] = [None] * n

    def work(i: int) -> ImageProblem | None:
        try:
            dec = decode_image(files[i], image_size, center_crop, boxes[i])
        except ImageProblem as exc:
            return exc
        buffer[i] = dec.pixels  # each thread writes its own row: no lock needed
        sizes[i], modes[i] = dec.original_size, dec.original_mode
        return None

    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        try:
            # map() yields in input order, so "first problem" is deterministic.
            for i, problem in enumerate(pool.map(work, range(n), chunksize=16)):
                bar.update(1)
                if problem is None:
                    ok[i] = True
                    continue
                problem.index = i  # type: ignore[attr-defined]
                if stop_at_first:
                    raise problem
                problems[i] = problem
                if on_problem is not None:
                    on_problem(i, problem)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()
    images = buffer if ok.all() else buffer[ok]
    return DecodeResult(np.ascontiguousarray(images), ok, problems, sizes, modes)

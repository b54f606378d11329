"""The code of agelab's MLflow Model: MLflow *models from code*.

:func:`agelab.tracking.models.log_model` logs this file as the model's ``python_model``;
MLflow keeps a copy of it with the model and loading (``mlflow.pyfunc.load_model``,
``mlflow models serve``) executes that copy, which imports the installed agelab. Nothing is
unpickled: the weights are a torch file read with ``torch.load(weights_only=True)``
(:func:`agelab.train.load_checkpoint`), the preprocessing and the conformal intervals are
JSON.

Input (:meth:`AgePredictor.predict`):

* a DataFrame with a column ``path`` (image files, read where the model runs) and/or
  ``image`` (base64 of an encoded image file: JPEG, PNG, …; what an HTTP request carries),
  optionally a face box ``x, y, w, h`` in pixels (as in a CSV manifest);
* or a numpy uint8 array of images: ``[N, 3, S, S]`` at the model's ``image_size`` S (the
  decoded form a dataset holds), or ``[N, H, W, 3]`` of any size (cropped and resized as a
  file would be).

Output: a DataFrame with ``age`` (years) and, for each conformal level the run calibrated
to a finite width, ``lower_<pct>`` / ``upper_<pct>`` (``lower_90``, ``upper_90``, …): the
split-conformal interval ``age ± q`` fitted on the run's conformal split.

Images are decoded by :func:`agelab.data.images.decode_image` (the decoder training used),
normalised with the stored mean/std, and run in fp32: the ages equal the run's logged
``predictions.csv`` for the same images.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from agelab.data.images import Box, Decoded, ImageProblem, crop_box, decode_image, to_rgb
from agelab.errors import DataError
from agelab.metrics.checks import pct

#: The model's artifacts (names in ``context.artifacts`` and files in the model folder).
WEIGHTS, PREPROCESSING, CONFORMAL = "weights", "preprocessing", "conformal"
BOX = ("x", "y", "w", "h")


def interval_columns(levels: Sequence[float]) -> list[str]:
    return [f"{side}_{pct(lv)}" for lv in levels for side in ("lower", "upper")]


@dataclass
class AgePredictor:
    """A trained model with what it needs to take images: decoding and normalisation as in
    training, and the run's conformal half-widths (level → q, finite ones only)."""

    model: Any  # agelab.models.AgeRegressor
    image_size: int
    center_crop: float = 1.0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    intervals: dict[float, float] = field(default_factory=dict)
    batch_size: int = 64

    # ------------------------------------------------------------------- building
    @classmethod
    def from_files(cls, weights: str | Path, preprocessing: str | Path, conformal: str | Path):
        """The model MLflow loads: checkpoint, preprocessing.json, conformal.json."""
        from agelab.train import load_checkpoint

        model, _meta = load_checkpoint(weights)
        pre = json.loads(Path(preprocessing).read_text())
        conf = json.loads(Path(conformal).read_text())
        intervals = {
            float(c["level"]): float(c["q"])
            for c in conf.get("levels", [])
            if c.get("q") is not None and math.isfinite(float(c["q"]))
        }
        return cls(
            model.eval(),
            int(pre["image_size"]),
            float(pre.get("center_crop", 1.0)),
            tuple(pre["normalisation"]["mean"]),
            tuple(pre["normalisation"]["std"]),
            intervals,
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path):
        """A bare checkpoint (``tracking.log_checkpoint``): image size and crop from the
        config saved in it; no conformal intervals (they live with the MLflow Model)."""
        from agelab.errors import CheckpointError
        from agelab.train import load_checkpoint

        model, meta = load_checkpoint(path)
        data = (meta.get("config") or {}).get("data") or {}
        if "image_size" not in data:
            raise CheckpointError(
                f"checkpoint {path} does not say its image size (no data.image_size in its "
                "config): predict with the run's MLflow Model instead (its run id)"
            )
        return cls(model.eval(), int(data["image_size"]), float(data.get("center_crop", 1.0)))

    # ------------------------------------------------------------------- decoding
    def decode(self, file: str | Path, box: Box | None = None) -> Decoded:
        """One image file, exactly as training decoded it."""
        return decode_image(file, self.image_size, self.center_crop, box)

    def decode_bytes(self, data: bytes, where: str) -> np.ndarray:
        """An encoded image file's bytes (from an HTTP request) → uint8 [3, S, S]."""
        with tempfile.TemporaryDirectory(prefix="agelab-image-") as tmp:
            file = Path(tmp) / "image"
            file.write_bytes(data)
            try:
                return self.decode(file).pixels
            except ImageProblem as exc:
                raise DataError(f"{where}: {exc.reason}: {exc.detail}", reason=exc.reason) from None

    def from_array(self, array: np.ndarray) -> np.ndarray:
        """uint8 ``[N,3,S,S]`` as it is, ``[N,H,W,3]`` cropped and resized like a file."""
        from PIL import Image

        a = np.asarray(array)
        s = self.image_size
        if a.dtype != np.uint8 or a.ndim != 4:
            raise DataError(
                f"an image array must be uint8 [N, 3, {s}, {s}] or [N, H, W, 3], got "
                f"{a.dtype} {list(a.shape)}; or send files (column path) or encoded images "
                "(column image, base64)"
            )
        if a.shape[1:] == (3, s, s):
            return np.ascontiguousarray(a)
        if a.shape[-1] != 3:
            raise DataError(
                f"an image array must be [N, 3, {s}, {s}] or [N, H, W, 3] (RGB), got "
                f"{list(a.shape)}"
            )
        out = np.empty((len(a), 3, s, s), dtype=np.uint8)
        for i, hwc in enumerate(a):
            img = to_rgb(Image.fromarray(np.ascontiguousarray(hwc), "RGB"))
            region = crop_box(img.size, self.center_crop, None)
            small = img.resize((s, s), Image.Resampling.LANCZOS, box=region)
            out[i] = np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)
        return out

    def from_frame(self, frame: pd.DataFrame) -> np.ndarray:
        """Rows with ``image`` (base64) or ``path`` (and optionally a box) → uint8 images."""
        if not {"path", "image"} & set(frame.columns):
            raise DataError(
                f"the input needs a column 'path' (image files) or 'image' (base64 of an "
                f"image file); it has {', '.join(map(str, frame.columns)) or 'none'}"
            )
        out = np.empty((len(frame), 3, self.image_size, self.image_size), dtype=np.uint8)
        for i, row in enumerate(frame.to_dict("records")):
            out[i] = self._row_pixels(row, f"row {i}")
        return out

    def _row_pixels(self, row: dict[str, Any], where: str) -> np.ndarray:
        encoded, path = _text(row.get("image")), _text(row.get("path"))
        if encoded:
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise DataError(
                    f"{where}: column image is not base64 (send base64.b64encode(open(file, "
                    "'rb').read()).decode())",
                    reason="not base64",
                ) from None
            return self.decode_bytes(data, f"{where} (image)")
        if not path:
            raise DataError(f"{where}: neither an image (base64) nor a path", reason="empty row")
        box = _box(row)
        try:
            return self.decode(path, box).pixels
        except ImageProblem as exc:
            raise DataError(f"{where} ({path}): {exc.reason}: {exc.detail}") from None
        except OSError as exc:
            raise DataError(f"{where} ({path}): cannot be read: {exc.strerror or exc}") from None

    def images(self, model_input: Any) -> np.ndarray:
        if isinstance(model_input, pd.DataFrame):
            return self.from_frame(model_input)
        if isinstance(model_input, dict):
            return self.from_frame(pd.DataFrame(model_input))
        return self.from_array(np.asarray(model_input))

    # ----------------------------------------------------------------- predicting
    @torch.inference_mode()
    def ages(self, images: np.ndarray) -> np.ndarray:
        """Ages (float64 [N]) of uint8 images [N, 3, S, S]: fp32 on the CPU, batch by batch."""
        x_all = torch.as_tensor(np.ascontiguousarray(images))
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.model.to("cpu").eval()
        outs = []
        for start in range(0, len(x_all), self.batch_size):
            x = x_all[start : start + self.batch_size].float().div_(255.0)
            outs.append(self.model.to_age(self.model((x - mean) / std).float()))
        if not outs:
            return np.zeros(0, dtype=np.float64)
        return torch.cat(outs).double().numpy()

    def table(self, ages: np.ndarray) -> pd.DataFrame:
        """``age`` and one ``lower_<pct>`` / ``upper_<pct>`` pair per conformal level."""
        out = pd.DataFrame({"age": np.asarray(ages, dtype=np.float64)})
        for level, q in sorted(self.intervals.items()):
            out[f"lower_{pct(level)}"] = out["age"] - q
            out[f"upper_{pct(level)}"] = out["age"] + q
        return out

    def predict(self, model_input: Any) -> pd.DataFrame:
        return self.table(self.ages(self.images(model_input)))


def _text(value: Any) -> str:
    """A cell as text; missing (None, NaN) → ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip()
    return str(value).strip()


def _box(row: dict[str, Any]) -> Box | None:
    values = [row.get(c) for c in BOX]
    if any(v is None for v in values):
        return None
    try:
        x, y, w, h = (float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return None if any(math.isnan(v) for v in (x, y, w, h)) else Box(x, y, w, h)


class AgeModel(PythonModel):
    """The pyfunc MLflow loads: an :class:`AgePredictor` from the model's artifacts."""

    def load_context(self, context) -> None:
        a = context.artifacts
        self.predictor = AgePredictor.from_files(a[WEIGHTS], a[PREPROCESSING], a[CONFORMAL])

    # The hint (a DataFrame, or an array: see the module docstring) tells MLflow that the
    # model's signature, not a hint, describes the input.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.predictor.predict(model_input)


mlflow.models.set_model(AgeModel())

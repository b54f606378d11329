"""Export a dataset to an image folder + ``labels.csv`` manifest (the ``csv`` source format).

Useful to look at synthetic faces with any image viewer, and to exercise the real-data path
(decode → validate → cache → split) end to end on files agelab made itself.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from agelab.csvsafe import safe_cell
from agelab.data.dataset import FaceDataset


def export_folder(data: FaceDataset, out: Path, *, progress: bool = True) -> Path:
    """Write ``out/images/{i:06d}.png`` and ``out/labels.csv`` (path, age, subject; a subject
    that a spreadsheet would run as a formula gets a leading ``'``, see :mod:`agelab.csvsafe`)."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    manifest = out / "labels.csv"
    tmp = manifest.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "age", "subject"])
        for i in tqdm(range(len(data)), desc="export", unit="img", disable=not progress):
            rel = f"images/{i:06d}.png"
            pixels = data.images[i].permute(1, 2, 0).numpy()  # HWC; streamed data too
            Image.fromarray(np.ascontiguousarray(pixels)).save(out / rel)
            writer.writerow([rel, f"{float(data.ages[i]):.3f}", safe_cell(str(data.subjects[i]))])
    tmp.replace(manifest)  # the manifest appears only once every image is on disk
    return manifest

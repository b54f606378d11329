"""load_dataset end to end, image decoding (modes, EXIF, crops), inspection, the real sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from agelab.config import DataConfig, SynthConfig
from agelab.data.dataset import FaceDataset
from agelab.data.images import Box, crop_box, decode_image
from agelab.data.inspect import format_inspection, inspect_source
from agelab.data.load import load_dataset
from agelab.errors import DataError


def solid(size, colour) -> Image.Image:
    return Image.new("RGB", size, colour)


def load(**kw) -> FaceDataset:
    return load_dataset(DataConfig(image_size=16, **kw), progress=False)


# ------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    if mode in ("I;16", "I", "F"):
        img = Image.fromarray(
            (rng.random((20, 24)) * 4000).astype(
                {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
            )
        )
        assert img.mode == mode or mode == "I;16"
    else:
        img = img.convert(mode)
    ext = {"CMYK": ".jpg", "F": ".tif", "I": ".tif"}.get(mode, ".png")
    path = tmp_path / f"x{ext}"
    img.save(path)
    dec = decode_image(path, 16)
    assert dec.pixels.shape == (3, 16, 16) and dec.pixels.dtype == np.uint8
    if mode in ("I;16", "I", "F"):
        assert dec.pixels.max() > 200  # rescaled to the full 8-bit range, not clipped


def test_alpha_composited_over_grey(tmp_path):
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.all(decode_image(tmp_path / "clear.png", 16).pixels == 128)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    dec = decode_image(tmp_path / "rot.jpg", 16, 1.0)
    assert dec.original_size == (20, 40)  # upright: portrait
    # After rotating clockwise, the white half is on top.
    top, bottom = dec.pixels[:, :8].mean(), dec.pixels[:, 8:].mean()
    assert top > 200 and bottom < 60


def test_centre_crop_fraction(tmp_path):
    img = solid((60, 40), (0, 0, 255))
    img.paste((255, 0, 0), (20, 10, 40, 30))  # a 20x20 red centre
    img.save(tmp_path / "c.png")
    full = decode_image(tmp_path / "c.png", 16, 1.0).pixels
    centre = decode_image(tmp_path / "c.png", 16, 0.5).pixels
    assert full[0].mean() < 200 and full[2].mean() > 50  # red centre + blue border
    assert centre[0].min() > 240 and centre[2].max() < 15  # all red


def test_face_box_crop_and_squaring(tmp_path):
    img = solid((100, 80), (0, 0, 255))
    img.paste((0, 255, 0), (60, 10, 90, 40))  # a 30x30 green face
    img.save(tmp_path / "b.png")
    pix = decode_image(tmp_path / "b.png", 16, box=Box(60, 10, 30, 30)).pixels
    inner = pix[:, 2:-2, 2:-2]  # the resampling filter blends a pixel of context at the edge
    assert inner[1].min() > 240 and inner[2].max() < 15
    # A non-square box becomes a square around its centre, shifted to stay inside the image.
    assert crop_box((100, 80), 1.0, Box(60, 10, 30, 20)) == (60, 5, 90, 35)
    assert crop_box((100, 80), 1.0, Box(90, 70, 20, 20)) == (80, 60, 100, 80)
    assert crop_box((100, 80), 1.0, None) == (10, 0, 90, 80)


def test_truncated_images_are_never_tolerated(tmp_path, monkeypatch):
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(
        buf, "JPEG"
    )
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:300])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some library might
    from agelab.data.images import ImageProblem

    with (
        pytest.warns(RuntimeWarning, match="LOAD_TRUNCATED_IMAGES"),
        pytest.raises(ImageProblem, match="truncated"),
    ):
        decode_image(tmp_path / "cut.jpg", 16)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------- load_dataset


def make_csv(root: Path, n: int = 12, subjects: bool = True, boxes: bool = False) -> Path:
    rng = np.random.default_rng(0)
    lines = ["path,age" + (",subject" if subjects else "") + (",x,y,w,h" if boxes else "")]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
        line = f"{i}.png,{5 + 6 * i % 90}" + (f",p{i // 2}" if subjects else "")
        lines.append(line + (",5,5,20,20" if boxes and i % 2 else ",,,," if boxes else ""))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_real_dataset_fields_and_info(tmp_path):
    data = load(source="csv", path=make_csv(tmp_path, boxes=True), cache_dir=tmp_path / "c")
    assert isinstance(data, FaceDataset) and len(data) == 12
    assert data.images.dtype == torch.uint8 and tuple(data.images.shape) == (12, 3, 16, 16)
    assert data.images.is_contiguous()
    assert data.ages.dtype == np.float32 and data.ages[0] == 5
    assert list(data.paths[:2]) == ["0.png", "1.png"] and data.source == "csv"
    assert len(data.fingerprint) == 64 and data.true_ages is None
    assert set(data.split) == {"train", "calib", "conformal", "test"}
    for s in set(data.subjects):
        assert len(set(data.split[data.subjects == s])) == 1  # subject-disjoint
    info = data.info
    for key in (
        "source",
        "n_images",
        "n_bad",
        "bad_rows",
        "age_min",
        "age_max",
        "age_mean",
        "image_size",
        "cache_hit",
        "seconds",
        "split",
        "original_sizes",
    ):
        assert key in info, key
    assert info["has_boxes"] and info["original_sizes"] == {"40x30": 12}
    assert (info["age_min"], info["age_max"], info["n_subjects"]) == (5.0, 71.0, 6)


def test_split_follows_the_split_config(tmp_path):
    path = make_csv(tmp_path, n=30, subjects=False)
    a = load(source="csv", path=path, cache_dir=tmp_path / "c")
    b = load(source="csv", path=path, cache_dir=tmp_path / "c", split={"seed": 1})
    assert a.fingerprint == b.fingerprint and b.info["cache_hit"]  # same decoded data
    assert not np.array_equal(a.split, b.split)


def test_synthetic_dataset():
    data = load(
        synthetic=SynthConfig(
            n_images=20, images_per_subject=4, label_noise={"kind": "normal", "scale": 3.0}
        )
    )
    assert len(data) == 20 and data.source == "synthetic" and data.paths is None
    assert data.subjects.dtype.kind == "U" and len(set(data.subjects)) == 5
    assert data.true_ages is not None and data.info["noise_floor_mae"] > 0
    for s in set(data.subjects):
        assert len(set(data.split[data.subjects == s])) == 1


def test_sources_registered_for_config_validation(tmp_path):
    assert DataConfig(source="fgnet", path=tmp_path).source == "fgnet"
    with pytest.raises(ValueError, match="valid choices: synthetic, utkface, fgnet, csv"):
        DataConfig(source="imdb", path=tmp_path)


def test_real_sample_loads_both_ways(faces_sample, tmp_path):
    via_csv = load(source="csv", path=faces_sample / "labels.csv", cache_dir=tmp_path)
    via_dir = load(source="utkface", path=faces_sample / "images", cache_dir=tmp_path)
    assert len(via_csv) == len(via_dir) == 250 and via_csv.info["n_bad"] == 0
    assert via_csv.info["original_sizes"] == {"200x200": 250}
    order = np.argsort(via_dir.paths)
    assert np.array_equal(via_csv.images.numpy(), via_dir.images.numpy()[order])
    assert set(via_csv.subjects) == {""}  # no subjects: every image is its own group
    counts = {k: v["n"] for k, v in via_csv.info["split"].items()}
    assert counts == {"train": 175, "calib": 25, "conformal": 13, "test": 37}


def test_wrong_utkface_folder_points_to_the_right_one(faces_sample, tmp_path):
    with pytest.raises(DataError, match=r"use data\.path=.*images"):
        load(source="utkface", path=faces_sample, cache_dir=tmp_path)


# ------------------------------------------------------------------------- inspect


def test_inspect_reports_counts_histogram_sizes_and_bad_rows(tmp_path):
    for i, age in enumerate([3, 15, 17, 44, 90]):
        solid((30 + i, 20), (i * 40, 0, 0)).convert("L" if i == 0 else "RGB").save(
            tmp_path / f"{age}_0_0_2017010{i}.jpg"
        )
    (tmp_path / "50_0_0_20170109.jpg").write_text("not an image")
    (tmp_path / "readme.txt").write_text("hi")
    report = inspect_source("utkface", tmp_path, progress=False)
    assert (report["n_rows"], report["n_ok"], report["n_bad"]) == (7, 5, 2)
    assert report["age_histogram"]["10-19"] == 2 and report["age_histogram"]["90-99"] == 1
    assert report["image_sizes"]["30x20"] == 1 and report["modes"] == {"L": 1, "RGB": 4}
    assert report["bad_rows"]["counts"] == {"name does not match pattern": 1, "not an image": 1}
    text = format_inspection(report)
    for needle in (
        "usable: 5",
        "10-19",
        "█",
        "30x20",
        "found 2 bad row(s)",
        "name does not match pattern",
        "readme.txt",
        "modes: RGB 4, L 1",
    ):
        assert needle in text, (needle, text)


def test_inspect_refuses_synthetic(tmp_path):
    with pytest.raises(DataError, match="preview"):
        inspect_source("synthetic", tmp_path, progress=False)


def test_inspect_real_sample(faces_sample):
    report = inspect_source("csv", faces_sample / "labels.csv", progress=False)
    assert report["n_ok"] == 250 and report["ages"]["max"] == 116
    assert sum(report["age_histogram"].values()) == 250
    assert "200x200" in format_inspection(report)

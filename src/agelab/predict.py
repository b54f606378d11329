"""The hand-off of a study's model: ``agelab predict`` and ``agelab register``.

``agelab predict MODEL IMAGES…``: MODEL is a run id, a ``models:/`` URI (``models:/name@alias``,
``models:/name/3``) or a checkpoint file; IMAGES a folder, a CSV manifest or image files.
Images are decoded and checked by the readers training uses (:mod:`agelab.data.sources`,
:mod:`agelab.data.images`), bad ones follow ``--on-bad error|skip``, and the table holds
``path, age, lower_<pct>, upper_<pct>`` (and ``true_age, residual`` when the manifest has ages).

``agelab register STUDY``: the best cell's best replicate, ranked as the ablation report ranks
cells (mean calib MAE, :func:`agelab.report.analyse`), becomes a version of a registered
model in MLflow's Model Registry, with its numbers as tags and an alias.
"""

from __future__ import annotations

import csv
import math
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from agelab.data.images import Box, ImageProblem
from agelab.data.sources import (
    EMPTY_FILE,
    HINTS,
    MISSING_FILE,
    MISSING_PATH,
    SPECIAL_FILE,
    BadRow,
    OnBad,
    format_bad_summary,
    special_file_kind,
    summarize_bad,
)
from agelab.errors import DataError

if TYPE_CHECKING:
    from agelab.config import StudyConfig, TrackingConfig

#: Files a folder contributes (by extension, case-insensitive); others are left alone.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Images decoded and predicted at a time (bounded memory, a steady progress bar).
CHUNK = 256
#: Inputs at least this long get a progress bar.
PROGRESS_FROM = 100
SKIP_FLAG = "or use --on-bad skip to predict the other images and list the bad ones"


# ------------------------------------------------------------------------------ inputs


@dataclass
class Inputs:
    """The images to predict, in order: the path shown in the output, the file read, its
    face box, and the age the manifest gives (NaN without one)."""

    shown: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    boxes: list[Box | None] = field(default_factory=list)
    ages: list[float] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    has_ages: bool = False

    def add(self, shown: str, file: str, box: Box | None = None, age: float = math.nan) -> None:
        self.shown.append(shown)
        self.files.append(file)
        self.boxes.append(box)
        self.ages.append(age)

    def __len__(self) -> int:
        return len(self.files)


def bad_message(row: BadRow) -> str:
    hint = HINTS.get(row.reason, "")
    return f"{row.where}: {row.reason}: {row.detail} ({hint + '; ' if hint else ''}{SKIP_FLAG})"


def _refuse(row: BadRow) -> DataError:
    return DataError(bad_message(row), reason=row.reason, where=row.where)


def collect_inputs(items: list[str], *, on_bad: OnBad = "error", max_age: float = 120.0) -> Inputs:
    """Folders (their image files, recursively, sorted), CSV manifests and image files →
    :class:`Inputs`. A path that does not exist always stops; problems of single rows and
    files follow ``on_bad`` (``error``: the first stops, ``skip``: recorded in ``bad``)."""
    out = Inputs()
    for item in items:
        path = Path(item)
        if not path.exists():
            raise DataError(f"{item} does not exist: give image files, a folder or a CSV manifest")
        if path.is_dir():
            _add_folder(out, path, on_bad)
        elif path.suffix.lower() == ".csv":
            _add_manifest(out, path, on_bad, max_age)
        else:
            _add_file(out, item, item, on_bad)
    if not len(out) and not out.bad:
        raise DataError(
            f"no images in {', '.join(items)} (image files end in {', '.join(IMAGE_SUFFIXES)})"
        )
    return out


def _add_file(out: Inputs, shown: str, file: str, on_bad: OnBad, **kw: Any) -> None:
    """One file, checked like a manifest row: it exists, is a regular file, is not empty."""
    problem = _file_problem(file)
    if problem is None:
        out.add(shown, os.path.abspath(file), **kw)
        return
    row = BadRow(problem[0], shown, problem[1])
    if on_bad == "error":
        raise _refuse(row)
    out.bad.append(row)


def _file_problem(file: str) -> tuple[str, str] | None:
    try:
        st = os.stat(file)
    except OSError as exc:
        return MISSING_FILE, f"cannot be read: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):  # never opened: a FIFO blocks, a device never ends
        return SPECIAL_FILE, f"is {special_file_kind(st.st_mode)}, not an image file"
    if st.st_size == 0:
        return EMPTY_FILE, "is empty (0 bytes)"
    return None


def _add_folder(out: Inputs, folder: Path, on_bad: OnBad) -> None:
    for file in _image_files(folder):
        _add_file(out, str(file), str(file), on_bad)


def _image_files(folder: Path) -> Iterator[Path]:
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(root) / name


def _add_manifest(out: Inputs, path: Path, on_bad: OnBad, max_age: float) -> None:
    """A manifest with ages is read as ``data.source=csv`` reads it (every check, paths
    relative to its folder); one without an ``age`` column is a list of paths."""
    from agelab.data.sources import read_csv

    if "age" not in _header(path):
        _add_path_list(out, path, on_bad)
        return
    manifest = read_csv(path, max_age=max_age, on_bad="skip")  # the policy is applied here
    if manifest.bad.rows and on_bad == "error":
        raise _refuse(manifest.bad.rows[0])
    out.bad += manifest.bad.rows
    out.has_ages = True
    t = manifest.table
    boxes = [None] * len(t)
    if manifest.has_boxes:
        boxes = [
            None if math.isnan(x) else Box(x, y, w, h)
            for x, y, w, h in zip(t["x"], t["y"], t["w"], t["h"], strict=True)
        ]
    for shown, file, box, age in zip(t["path"], t["file"], boxes, t["age"], strict=True):
        out.add(str(shown), str(file), box, float(age))


def _header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            return [h.strip().lower() for h in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return ["age"]  # let the manifest reader say what is wrong with it


def _add_path_list(out: Inputs, path: Path, on_bad: OnBad) -> None:
    """A CSV with a ``path`` column and no ages: each path relative to the CSV's folder."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    names = {k.strip().lower(): k for k in (rows[0].keys() if rows else [])}
    if "path" not in names:
        raise DataError(f"{path} has no column 'path' (a manifest needs path[,age,…])")
    for line, row in enumerate(rows, start=2):
        rel = (row.get(names["path"]) or "").strip()
        where = f"{path} line {line}" + (f" ({rel})" if rel else "")
        if not rel:
            bad = BadRow(MISSING_PATH, where, "the path is empty")
            if on_bad == "error":
                raise _refuse(bad)
            out.bad.append(bad)
            continue
        _add_file(out, rel, str(path.parent / rel), on_bad)


# ------------------------------------------------------------------------- predicting


def load_model(spec: str, tracking: TrackingConfig):
    """``(predictor, what)``: a checkpoint file, or an MLflow Model by run id or URI."""
    looks_like_file = spec.endswith((".pt", ".pth")) or (
        os.sep in spec and not spec.startswith("models:/")
    )
    if looks_like_file and not Path(spec).exists():
        from agelab.errors import CheckpointError

        raise CheckpointError(
            f"checkpoint {spec} does not exist; MODEL is a checkpoint file, a run id or a "
            "models:/ URI"
        )
    if Path(spec).is_file():
        from agelab.tracking.pyfunc_model import AgePredictor

        return AgePredictor.from_checkpoint(spec), f"checkpoint {spec}"
    from agelab.tracking.models import load_predictor, open_store

    predictor, uri = load_predictor(open_store(tracking), spec)
    return predictor, uri


def predict_inputs(predictor, inputs: Inputs, *, on_bad: OnBad, progress: bool) -> pd.DataFrame:
    """Decode and predict ``inputs`` chunk by chunk; the table has one row per good image."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(inputs),
        desc="predicting",
        unit="img",
        disable=not progress or len(inputs) < PROGRESS_FROM,
    )
    keep, ages = [], []
    try:
        for start in range(0, len(inputs), CHUNK):
            ok, chunk_ages = _predict_chunk(predictor, inputs, start, on_bad)
            keep += [start + i for i in np.flatnonzero(ok)]
            ages.append(chunk_ages)
            bar.update(len(ok))
    finally:
        bar.close()
    table = predictor.table(np.concatenate(ages) if ages else np.zeros(0))
    table.insert(0, "path", [inputs.shown[i] for i in keep])
    if inputs.has_ages:
        table["true_age"] = np.asarray(inputs.ages, dtype=np.float64)[keep]
        table["residual"] = table["age"] - table["true_age"]
    return table


def _predict_chunk(predictor, inputs: Inputs, start: int, on_bad: OnBad):
    from agelab.data.images import decode_many

    end = min(start + CHUNK, len(inputs))
    try:
        result = decode_many(
            inputs.files[start:end],
            predictor.image_size,
            predictor.center_crop,
            inputs.boxes[start:end],
            stop_at_first=on_bad == "error",
        )
    except ImageProblem as exc:
        i = start + exc.index  # type: ignore[attr-defined]
        raise _refuse(BadRow(exc.reason, inputs.shown[i], exc.detail)) from None
    for i, problem in sorted(result.problems.items()):
        inputs.bad.append(BadRow(problem.reason, inputs.shown[start + i], problem.detail))
    ages = predictor.ages(result.images) if len(result.images) else np.zeros(0)
    return result.ok, ages


def run_predict(
    spec: str,
    items: list[str],
    *,
    tracking: TrackingConfig,
    out: Path | None = None,
    on_bad: OnBad = "error",
    progress: bool = True,
) -> pd.DataFrame:
    """``agelab predict``: the table, written to ``out`` (CSV, spreadsheet-safe) or stdout;
    what was skipped and what was written go to stderr."""
    from agelab.csvsafe import safe_frame

    inputs = collect_inputs(items, on_bad=on_bad)  # the cheap checks before the model loads
    predictor, what = load_model(spec, tracking)
    table = predict_inputs(predictor, inputs, on_bad=on_bad, progress=progress)
    if inputs.bad:
        print(f"agelab: {format_bad_summary(summarize_bad(inputs.bad))}", file=sys.stderr)
    if not len(table):
        raise DataError(f"no usable images among {len(inputs) + len(inputs.bad)} input(s)")
    if out is None:
        safe_frame(table).to_csv(sys.stdout, index=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        safe_frame(table).to_csv(out, index=False)
    where = f"wrote {out}" if out else "table on stdout"
    print(f"predicted {len(table)} image(s) with {what}; {where}", file=sys.stderr)
    return table


# --------------------------------------------------------------------------- register


#: Trial runs `agelab check` set aside: never ranked (as in the report).
SET_ASIDE = ("ORPHAN", "INVALID", "DUPLICATE")


@dataclass
class Champion:
    """The run ``agelab register`` hands on, and why it is the one."""

    run: dict[str, Any]  # its row of the runs table (run_id, seed, metrics, …)
    cell: dict[str, Any]  # its cell's row of the report's cell table
    parent_tags: dict[str, str]


def champion(cfg: StudyConfig, tracker) -> Champion:
    """The best cell by mean calib MAE (as the report ranks), and in it the replicate with
    the lowest calib MAE (the objective; ties: the earlier run)."""
    from agelab.errors import ReportError
    from agelab.report import analyse, design_from_parent, runs_table
    from agelab.report.design import within_design
    from agelab.tracking import TAG_KIND, TAG_STUDY, runs_frame

    runs = tracker.search(f"tags.`{TAG_STUDY}` = '{cfg.name}'")
    parents = [r for r in runs if r.data.tags.get(TAG_KIND) == "study"]
    if not parents:
        raise ReportError(
            f"no runs of study {cfg.name!r} in {tracker.display_uri}: run it first "
            "(agelab run STUDY), or point --root / MLFLOW_TRACKING_URI at its store"
        )
    parent = max(parents, key=lambda r: r.info.start_time or 0)
    design = design_from_parent(dict(parent.data.params))
    trials = _this_config(
        runs_frame([r for r in runs if r.data.tags.get(TAG_KIND) == "trial"]),
        parent.data.tags.get("agelab.config_hash"),
    )
    table, _ = within_design(runs_table(trials, design), design)
    analysis = analyse(table, design) if not table.empty else None
    if analysis is None or analysis.best is None:
        raise ReportError(f"study {cfg.name!r} has no completed trial to register yet")
    best = analysis.best["best"]
    done = analysis.complete
    mask = np.ones(len(done), dtype=bool)
    for k in design.keys:
        mask &= (done[k].astype(str) == str(best[k])).to_numpy()
    mine = done[mask].copy()
    mine["_objective"] = mine["best_calib_mae"].where(
        mine["best_calib_mae"].notna(), mine["calib_mae"]
    )
    run = mine.sort_values(["_objective", "start_time"]).iloc[0].to_dict()
    return Champion(run, best, dict(parent.data.tags))


def _this_config(trials: pd.DataFrame, config_hash: str | None) -> pd.DataFrame:
    if trials.empty:
        return trials
    state = trials.get("tags.agelab.state", pd.Series("", index=trials.index)).fillna("")
    keep = ~state.isin(SET_ASIDE)
    if config_hash and "tags.agelab.config_hash" in trials:
        have = trials["tags.agelab.config_hash"]
        keep &= have.isna() | (have == config_hash)
    return trials[keep]


def champion_tags(c: Champion, cfg: StudyConfig, fingerprint: str | None) -> dict[str, str]:
    """The registered version's tags: where it comes from and how good it is."""
    run = c.run
    tags = {
        "study": cfg.name,
        "cell": str(c.cell["cell"]),
        "replicate": str(run.get("seed")),
        "calib_mae": _num(run.get("_objective")),
        "test_mae": _num(run.get("mae")),
        "coverage_at_mae": _num(run.get("coverage_at_mae")),
        "cell_calib_mae": _num(c.cell.get("calib_mae")),
        "cell_test_mae": _num(c.cell.get("mae")),
        "cell_replicates": str(int(c.cell.get("n", 0))),
        "dataset_fingerprint": fingerprint or c.parent_tags.get("agelab.dataset_fingerprint", ""),
        "config_hash": c.parent_tags.get("agelab.config_hash", ""),
    }
    for key, value in run.items():
        if key.startswith("conformal_") and key.endswith("_width") and "band" not in key:
            tags[key] = _num(value)
    return tags


def _num(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{v:.4f}" if math.isfinite(v) else str(v)


def run_register(cfg: StudyConfig, *, name: str | None, alias: str | None) -> dict[str, Any]:
    """``agelab register``: the champion run's MLflow Model as a new version of ``name``
    (default: the study's name without its version suffix) with ``alias``; returns what was
    registered."""
    from agelab.tracking import Tracker
    from agelab.tracking.models import model_of_run, register, registered_name_ok

    # Every version of a study (demo, demo.v2, …) registers under one name: models:/demo@champion
    # is the latest champion.
    name = registered_name_ok(name or re.sub(r"\.v([2-9]|[1-9]\d+)$", "", cfg.name))
    tracker = Tracker(cfg.tracking, cfg.tracking.experiment or cfg.name, create=False)
    c = champion(cfg, tracker)
    run_id = str(c.run["run_id"])
    model_id = model_of_run(tracker, run_id)
    fingerprint = None
    if model_id is not None:
        fingerprint = tracker.client.get_logged_model(model_id).tags.get(
            "agelab.dataset_fingerprint"
        )
    tags = champion_tags(c, cfg, fingerprint)
    description = (
        f"Study {cfg.name}: best cell by mean calib MAE, {tags['cell']} "
        f"({tags['cell_replicates']} replicate(s), calib MAE {tags['cell_calib_mae']}, test MAE "
        f"{tags['cell_test_mae']}); this is its best replicate (seed {tags['replicate']}, calib "
        f"MAE {tags['calib_mae']}, test MAE {tags['test_mae']}), run {run_id}."
    )
    version = register(tracker, run_id, name, alias=alias, tags=tags, description=description)
    return {
        "name": name,
        "version": version.version,
        "alias": alias,
        "run_id": run_id,
        "model_id": model_id,
        "tags": tags,
        "store": tracker.display_uri,
    }

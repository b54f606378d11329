"""What a study searched (:class:`Design`) and its runs as one table, one row per trial.

The report never talks to a store: it takes the study's trial runs as a pandas DataFrame,
one row per run (``run_id``, ``run_name``, ``status``, ``start_time`` in epoch ms, and
``params.<name>`` / ``tags.<name>`` / ``metrics.<name>`` columns as ``mlflow.search_runs``
names them; see :func:`agelab.tracking.runs_frame`) and the parent run's params.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from agelab.config import Range
from agelab.errors import ReportError
from agelab.tracking import TAG_REASON, TAG_STATE

#: Short names for the usual factors (others keep their last dotted part).
SHORT = {"model.norm": "norm", "model.act": "act", "model.backbone": "backbone"}
#: Columns summarised per cell: (metric, label in the tables).
CELL_METRICS = (
    ("mae", "test MAE"),
    ("coverage_at_mae", "within MAE"),
    ("coverage_at_5", "within 5 y"),
    ("conformal_90_width", "conformal 90 % width"),
    ("conformal_90_coverage", "conformal 90 % coverage"),
    ("shape_beta", "shape β"),
)
#: Per-run metrics the report reads beyond :data:`CELL_METRICS` (NaN where a run lacks them:
#: runs logged before a metric existed still report).
RUN_METRICS = (
    "best_calib_mae",
    "calib_mae",
    "shape_beta_low",
    "shape_beta_high",
    "coverage_at_mae_gennorm",
    "years_for_50",
    "years_for_80",
    "n_calib_split",
    "n_conformal_split",
)
#: What a replicate seed may vary (``search.replicate_varies``), in words.
VARIES = {
    "init": "the initialisation, batch order and augmentation (train.seed)",
    "split": "the data split (data.split.seed)",
}
STATES = ("COMPLETE", "FAIL", "PRUNED", "KILLED", "RUNNING")


@dataclass
class Design:
    """What the study searched: categorical factors (with their planned levels) and ranges."""

    factors: list[str]
    levels: dict[str, list[Any]]
    numeric: list[str] = field(default_factory=list)
    log_numeric: set[str] = field(default_factory=set)
    seeds: list[Any] = field(default_factory=list)
    sampler: str = "grid"
    planned: int | None = None
    #: What a replicate varied (``search.replicate_varies``); None: the study predates the
    #: setting, so a replicate varied train.seed only (initialisation, batch order).
    replicate_varies: list[str] | None = None

    @classmethod
    def from_space(
        cls,
        space: dict[str, Any],
        seeds: list[Any],
        sampler: str = "grid",
        n_trials: int | None = None,
    ) -> Design:
        factors, levels, numeric, log_numeric = [], {}, [], set()
        for key, value in space.items():
            if isinstance(value, dict):
                value = Range.model_validate(value)
            if isinstance(value, Range):
                numeric.append(key)
                if value.log:
                    log_numeric.add(key)
            else:
                factors.append(key)
                levels[key] = list(value)
        if sampler == "grid":
            planned = math.prod(len(v) for v in levels.values()) * len(seeds)
        elif sampler == "random":
            planned = (n_trials or 0) * len(seeds)
        else:
            planned = n_trials
        return cls(factors, levels, numeric, log_numeric, list(seeds), sampler, planned)

    @property
    def keys(self) -> list[str]:
        return self.factors + self.numeric

    def label(self, key: str) -> str:
        return SHORT.get(key, key.split(".")[-1])


def cell_label(row: pd.Series | dict, keys: list[str], design: Design) -> str:
    return " · ".join(f"{design.label(k)}={_fmt_level(row[k])}" for k in keys)


def _fmt_level(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def design_from_parent(params: dict[str, str]) -> Design:
    """The design from a study's parent-run params (``search.space`` is JSON)."""
    try:
        space = json.loads(params.get("search.space", "{}"))
        seeds = json.loads(params.get("search.seeds", "[0]"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"the study's parent run has unreadable search params: {exc}") from None
    n_trials = params.get("search.n_trials")
    design = Design.from_space(
        space,
        seeds,
        sampler=params.get("search.sampler", "grid"),
        n_trials=int(n_trials) if n_trials not in (None, "None", "") else None,
    )
    design.replicate_varies = _text_list(params.get("search.replicate_varies"))
    return design


def _text_list(value: str | None) -> list[str] | None:
    """A logged list param (JSON, or the Python repr MLflow makes of a list) → its items."""
    if value is None or not value.strip():
        return None
    for parse in (json.loads, ast.literal_eval):
        with contextlib.suppress(ValueError, SyntaxError, TypeError):
            parsed = parse(value)
            if isinstance(parsed, list | tuple):
                return [str(v) for v in parsed]
            return [str(parsed)]
    return [v.strip(" '\"") for v in value.strip("[]").split(",") if v.strip(" '\"")]


def _typed(value: str | None, key: str, design: Design) -> Any:
    if value is None:
        return math.nan
    if key in design.numeric:
        try:
            return float(value)
        except ValueError:
            return math.nan
    levels = design.levels.get(key, [])
    by_text = {str(v): v for v in levels}
    if value in by_text:
        return by_text[value]
    # Logged params are the validated config's values: 0 may come back as "0.0", a list as
    # JSON. Match by value before giving up.
    for v in levels:
        if isinstance(v, bool | str):
            continue
        with contextlib.suppress(ValueError, TypeError):
            if isinstance(v, int | float) and float(value) == float(v):
                return v
            if json.loads(value) == v:
                return v
    return value


def runs_table(frame: pd.DataFrame, design: Design) -> pd.DataFrame:
    """Trial runs (one row per MLflow run) → one row per planned trial: its state, seed,
    choices (typed as the study spelled them) and metrics. A retried trial keeps its best
    attempt (completed first, then the latest); ``attempts`` counts them."""
    rows = [_trial_row(run, design) for run in frame.to_dict("records")]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    rank = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "KILLED": 4}
    df["_rank"] = df["state"].map(rank).fillna(5)
    # Grid/random: a plan key is one planned trial, retried after a crash. TPE may sample the
    # same cell and seed again on purpose: every completed TPE run counts.
    df["_key"] = df["plan_key"]
    if design.sampler == "tpe":
        done = df["state"] == "COMPLETE"
        df.loc[done, "_key"] = df.loc[done, "run_id"]
    df = df.sort_values(["_key", "_rank", "start_time"], ascending=[True, True, False])
    df["attempts"] = df.groupby("_key")["run_id"].transform("size")
    df = df.drop_duplicates("_key", keep="first").drop(columns=["_rank", "_key"])
    for col in ("mae", "best_calib_mae", "calib_mae"):
        if col not in df.columns:
            df[col] = math.nan
    return df.sort_values("start_time").reset_index(drop=True)


_STATUS_STATE = {"FINISHED": "COMPLETE", "FAILED": "FAIL", "KILLED": "KILLED"}


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _trial_row(run: dict[str, Any], design: Design) -> dict[str, Any]:
    def tag(name: str, default: Any = None) -> Any:
        value = run.get(f"tags.{name}")
        return value if _present(value) else default

    status = run.get("status")
    state = tag(TAG_STATE) or _STATUS_STATE.get(status, status)
    if state == "FAIL" and status == "KILLED":
        state = "KILLED"  # a dead worker's trial: re-queued, not a failure of the cell
    start = run.get("start_time")
    row = {
        "run_id": run["run_id"],
        "run_name": run.get("run_name"),
        "start_time": start if _present(start) else 0,
        "status": status,
        "state": state,
        "reason": tag(TAG_REASON, ""),
        "verdict": tag("agelab.verdict", ""),
        "plan_key": tag("agelab.plan_key", run["run_id"]),
    }
    params = {
        k[len("params.") :]: v for k, v in run.items() if k.startswith("params.") and _present(v)
    }
    # A run killed before its params were logged still names its trial in the plan key.
    planned = dict(part.split("=", 1) for part in row["plan_key"].split(" | ") if "=" in part)
    seed = params.get("trial.seed", tag("agelab.replicate", planned.get("seed")))
    row["seed"] = _typed(seed, "seed", design)
    row["split_seed"] = params.get("data.split.seed", math.nan)  # what the replicate used
    for key in design.keys:  # the plan key holds the raw choice: match it first
        row[key] = _typed(planned.get(key, params.get(key)), key, design)
    # Every metric column of the trial runs (NaN where this run logged none): the frame holds
    # only what some trial logged, in the order MLflow listed it.
    row |= {k[len("metrics.") :]: _unclip(v) for k, v in run.items() if k.startswith("metrics.")}
    return row


def _unclip(value: Any) -> float:
    """A logged metric: MLflow stores ±inf (e.g. a conformal width with too few calibration
    points) as ±1.797e308; read it back as ±inf."""
    v = float(value)
    return math.copysign(math.inf, v) if abs(v) >= 1.79e308 else v


def normalise_runs(runs: pd.DataFrame, design: Design) -> pd.DataFrame:
    """Fill the columns :func:`analyse` relies on (a minimal table needs keys, seed, mae)."""
    df = runs.copy()
    missing = [k for k in [*design.keys, "seed"] if k not in df.columns]
    if missing:
        raise ReportError(f"runs table lacks the column(s) {missing}")
    if "state" not in df.columns:
        df["state"] = "COMPLETE"
    # Failed or pruned runs never log test metrics: a study of only those still reports.
    for col in (*RUN_METRICS, *(m for m, _ in CELL_METRICS), "split_seed"):
        if col not in df.columns:
            df[col] = math.nan
    for col in ("verdict", "reason"):
        if col not in df.columns:
            df[col] = ""
    if "attempts" not in df.columns:
        df["attempts"] = 1
    df["state"] = df["state"].fillna("RUNNING")
    # Levels as the study spelled them (a column of 0 and 0.2 would otherwise read 0.0).
    for f in design.factors:
        levels = design.levels.get(f, [])
        df[f] = pd.Series([_canon(v, levels) for v in df[f]], index=df.index, dtype=object)
    return df


def _canon(value: Any, levels: list[Any]) -> Any:
    for lv in levels:
        if type(lv) is type(value) and lv == value:
            return lv
    for lv in levels:
        if isinstance(lv, bool) or isinstance(value, bool):
            continue
        numbers = isinstance(lv, int | float) and isinstance(value, int | float | np.number)
        if numbers and float(lv) == float(value):
            return lv
    return value


def within_design(table: pd.DataFrame, design: Design) -> tuple[pd.DataFrame, int]:
    """(the rows inside the current design, how many were left out): a grid that dropped a
    level or a seed keeps those trials in the store, but they are not part of its report."""
    if table.empty or design.sampler != "grid":
        return table, 0
    keep = np.ones(len(table), dtype=bool)
    for f in design.factors:  # rows hold the levels as _typed matched them
        keep &= table[f].astype(str).isin({str(v) for v in design.levels.get(f, [])}).to_numpy()
    seeds = {str(s) for s in design.seeds}
    keep &= table["seed"].astype(str).isin(seeds).to_numpy()
    return table[keep].reset_index(drop=True), int((~keep).sum())

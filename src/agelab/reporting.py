"""The ablation report of a study in the store: read its runs, analyse, write, log.

The wiring between :mod:`agelab.tracking` (the study's runs from MLflow as a DataFrame),
:mod:`agelab.report` (pure analysis and rendering) and :mod:`agelab.study` (fANOVA
importances by Optuna). ``agelab report`` calls it, and ``agelab run`` after each study.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agelab.config import ReportConfig, StudyConfig, TrackingConfig
from agelab.config.schema import contained_name
from agelab.errors import ReportError
from agelab.report import Analysis, Design, analyse, design_from_parent, render, runs_table
from agelab.report.design import within_design
from agelab.tracking import TAG_KIND, TAG_STATE, TAG_STUDY, Tracker, runs_frame
from agelab.tracking.store import TAG_DESCRIPTION, TAG_NOTE


@dataclass
class ReportResult:
    study: str  # the study (version) reported
    analysis: Analysis
    folder: Path
    markdown: Path
    html: Path
    parent_run_id: str | None


def report_for_config(cfg: StudyConfig, **kwargs: Any) -> ReportResult:
    """The report of study ``cfg.name`` (an exact study version: ``agelab report`` resolves a
    study file to its version with :func:`agelab.study.version_for_report`)."""
    return build_report(
        cfg.name, cfg.tracking, cfg.report, experiment=cfg.tracking.experiment, **kwargs
    )


def build_report(
    study: str,
    tracking: TrackingConfig,
    report: ReportConfig | None = None,
    *,
    experiment: str | None = None,
    out_dir: Path | None = None,
    log: bool = True,
) -> ReportResult:
    """Read a study's runs, analyse them, write ``report.md`` / ``report.html`` + figures to
    ``<tracking.root>/reports/<study>/`` and log them on the study's latest parent run."""
    report = report or ReportConfig()
    tracker = Tracker(tracking, experiment or study, create=False)
    runs = tracker.search(f"tags.`{TAG_STUDY}` = '{study}'")
    # One frame per kind, so the trials' table holds only the metrics trials logged.
    parents = runs_frame([r for r in runs if r.data.tags.get(TAG_KIND) == "study"])
    trials = runs_frame([r for r in runs if r.data.tags.get(TAG_KIND) == "trial"])
    if parents.empty:
        raise ReportError(
            f"no runs of study {study!r} in {tracker.experiment_name!r} at "
            f"{tracker.display_uri}: run it first (agelab run <config>), or point "
            "tracking.root / MLFLOW_TRACKING_URI at the store that has it"
        )
    parent = parents.loc[parents["start_time"].fillna(0).idxmax()]  # the latest invocation
    parent_params = _prefixed(parent, "params.")
    design = design_from_parent(parent_params)
    trials, excluded = _trials_of_this_config(trials, _prefixed(parent, "tags."))
    analysis = _analyse(trials, design, parent_params, report, excluded)
    # --out is the user's own path; the default folder is named after the study: kept inside.
    default = tracking.root / "reports" / contained_name(study, "a report folder", "study name")
    folder = Path(out_dir) if out_dir else default
    cs_curves = _cs_curves(tracker, analysis) if report.figures else {}
    md, html = render.write(
        analysis,
        folder,
        meta=_meta(study, tracker, design, _prefixed(parent, "tags."), parent["run_id"]),
        figures=report.figures,
        cs_curves=cs_curves,
    )
    if log:
        tracker.log_artifacts(parent["run_id"], folder, "report")
        # The answer first: on the parent run's note and above the experiment's runs table.
        note = verdict_note(_description(_prefixed(parent, "tags.")), analysis.verdict)
        tracker.set_tags(parent["run_id"], {TAG_NOTE: note})
        tracker.set_experiment_note(note)
    return ReportResult(study, analysis, folder, md, html, parent["run_id"])


def _prefixed(row: pd.Series, prefix: str) -> dict[str, str]:
    """``params.*`` / ``tags.*`` of one run as a plain dict (absent ones left out)."""
    return {
        k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix) and isinstance(v, str)
    }


#: Trial runs a consistency check set aside (see agelab.study.check): never in a report.
SET_ASIDE = ("ORPHAN", "INVALID", "DUPLICATE")


def _trials_of_this_config(
    trials: pd.DataFrame, parent_tags: dict[str, str]
) -> tuple[pd.DataFrame, list[str]]:
    """The trial runs of the parent's config (identity hash), and why the others are out."""
    if trials.empty:
        return trials, []
    excluded = []
    state = trials.get(f"tags.{TAG_STATE}", pd.Series("", index=trials.index)).fillna("")
    aside = state.isin(SET_ASIDE)
    if aside.any():
        excluded.append(
            f"{int(aside.sum())} run(s) set aside by `agelab check` (orphaned, invalid or "
            "duplicate runs)"
        )
    want = parent_tags.get("agelab.config_hash")
    have = trials.get("tags.agelab.config_hash", pd.Series(None, index=trials.index))
    # Runs of an agelab that predates study identities carry no hash: kept with their study.
    other = have.notna() & (have != want) if want else pd.Series(False, index=trials.index)
    if other.any():
        hashes = ", ".join(sorted(set(have[other].astype(str))))
        excluded.append(
            f"{int(other.sum())} run(s) of another config (hash {hashes}; this one is {want})"
        )
    return trials[~aside & ~other], excluded


def _analyse(
    trials: pd.DataFrame,
    design: Design,
    parent_params: dict[str, str],
    report: ReportConfig,
    excluded: list[str],
) -> Analysis:
    table = runs_table(trials, design)
    table, outside = within_design(table, design)
    if outside:
        excluded = [*excluded, f"{outside} trial(s) outside the current search space or seeds"]
    if table.empty:
        table = pd.DataFrame(columns=[*design.keys, "seed", "mae", "state"])
    importances = None
    if design.sampler != "grid" and len(design.keys) >= 1:
        from agelab.study import param_importances

        done = table[table["state"] == "COMPLETE"]
        importances = param_importances(
            json.loads(parent_params.get("search.space", "{}")),
            done[design.keys].to_dict("records"),
            done["mae"].astype(float).tolist(),
        )
    return analyse(
        table,
        design,
        alpha=report.alpha,
        confidence=report.confidence,
        importances=importances,
        excluded=excluded,
        min_effect=report.min_effect,
        power=report.power,
    )


def _meta(
    study: str, tracker: Tracker, design: Design, tags: dict[str, str], parent_id: str
) -> dict[str, str]:
    """The report's header line: where the runs come from and what produced them."""
    return {
        "study": study,
        "experiment": tracker.experiment_name,
        "store": tracker.display_uri,
        "parent_run": parent_id,
        "sampler": design.sampler,
        "config_hash": tags.get("agelab.config_hash", ""),
        "git_commit": tags.get("agelab.git_commit", ""),
        "dataset": tags.get("agelab.dataset_fingerprint", "")[:12],
        "device": tags.get("agelab.device", ""),
        "description": _description(tags),
    }


def _description(parent_tags: dict[str, str]) -> str:
    """The study's description, as its parent run recorded it (runs older than the
    ``agelab.description`` tag have it as their note only)."""
    return parent_tags.get(TAG_DESCRIPTION, parent_tags.get(TAG_NOTE, ""))


def verdict_note(description: str, verdict: list[str]) -> str:
    """The parent run's note and the experiment's description (Markdown, shown by the UI):
    the study's description, then the report's verdict sentences."""
    head = (
        "**Verdict** of the ablation report (report/report.html in the artifacts of the "
        "study's parent run):"
    )
    bullets = "\n".join(f"- {sentence}" for sentence in verdict) or "- (no verdict yet)"
    return "\n\n".join(p for p in (description.strip(), head, bullets) if p)


def _cs_curves(tracker: Tracker, analysis: Analysis) -> dict[str, pd.DataFrame]:
    """Mean CS curve (observed and predicted) of the best and worst cells' runs."""
    if analysis.best is None or "run_id" not in analysis.runs:
        return {}
    order = analysis.best["order"]
    cells = analysis.cells.set_index("cell")
    picks = {"best": cells.loc[order[0]]}
    if len(order) > 1:
        picks["worst"] = cells.loc[order[-1]]
    done = analysis.complete
    out = {}
    for which, cell in picks.items():
        mask = np.ones(len(done), dtype=bool)
        for k in analysis.design.keys:
            mask &= (done[k].astype(str) == str(cell[k])).to_numpy()
        curves = _download_curves(tracker, done.loc[mask, "run_id"])
        if curves:
            mean = pd.concat(curves).groupby("k", as_index=False).mean()
            mean.attrs["cell"] = cell.name
            mean.attrs["n"] = len(curves)
            out[which] = mean
    return out


def _download_curves(tracker: Tracker, run_ids: pd.Series) -> list[pd.DataFrame]:
    curves = []
    with tempfile.TemporaryDirectory(prefix="agelab-report-") as scratch:
        for run_id in run_ids:
            path = tracker.download_artifact(run_id, "cs_curve.csv", Path(scratch) / run_id)
            if path is not None:
                curves.append(pd.read_csv(path))
    return curves


def print_verdict(result: ReportResult, header: str) -> None:
    """The verdict sentences on stdout, under ``header``."""
    print(header)
    for sentence in result.analysis.verdict:
        print(f"  - {sentence}")

"""Do the two stores agree? A study's Optuna trials against its MLflow runs and artifacts.

A COMPLETE trial's result stands only if its MLflow run exists, is FINISHED, holds the final
metrics and its artifacts. Otherwise the trial is marked invalid (a study attribute: Optuna
freezes finished trials) and its cell is planned again. A FINISHED trial run that no valid
COMPLETE trial claims (its trial was lost with the journal, or another run holds the
trial's result) is tagged ORPHAN or DUPLICATE and left out of reports. Nothing is deleted:
every repair is a tag or a queued trial, and each is said.

Runs at the start of every ``agelab run`` (after the recovery of dead workers' trials) and
as ``agelab check STUDY``.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from agelab.config import StudyConfig
from agelab.errors import StoreError
from agelab.secrets import mask_uri
from agelab.study.plan import A_CELL, A_KEY, A_RUN, S_INVALID, invalid_trials, valid_complete
from agelab.tracking import FINISHED, RUNNING, TAG_KIND, TAG_REASON, TAG_STATE, TAG_STUDY, Tracker

#: What a finished trial's run must hold for its result to stand.
FINAL_METRICS = ("mae", "best_calib_mae")
REQUIRED_ARTIFACTS = ("config.json", "diagnostics.json")


@dataclass
class Finding:
    problem: str
    action: str  # what was done (or, in a dry run, what would be done)


def check(study: optuna.Study, tracker: Tracker, *, repair: bool = True) -> list[Finding]:
    """Compare the stores; repair what is safe to repair unless ``repair`` is False."""
    runs = [
        r
        for r in tracker.search(f"tags.`{TAG_STUDY}` = '{study.study_name}'")
        if r.data.tags.get(TAG_KIND) == "trial"
    ]
    by_id = {r.info.run_id: r for r in runs}
    findings, invalidated = _lost_results(study, tracker, by_id, repair)
    # Runs of valid results, and runs just tagged INVALID with their trial: both accounted for.
    claimed = {t.user_attrs.get(A_RUN) for t in valid_complete(study)} | invalidated
    findings += _unclaimed_runs(study, tracker, runs, claimed, repair)
    return findings


def _lost_results(
    study: optuna.Study, tracker: Tracker, by_id: dict, repair: bool
) -> tuple[list[Finding], set[str]]:
    """COMPLETE trials whose run, final metrics or artifacts are gone: invalid, re-queued.
    Returns the findings and the run ids of the invalidated trials."""
    findings, invalid, runs = [], {}, set()
    requeue = "its cell is queued again" if study_kind(study) == "planned" else (
        "a new trial will be sampled in its place"
    )  # fmt: skip
    for t in valid_complete(study):
        run_id = t.user_attrs.get(A_RUN)
        try:
            problem = _why_invalid(tracker, by_id.get(run_id), run_id)
        except Exception as exc:  # the store did not answer: verify later, change nothing
            findings.append(
                Finding(
                    f"trial {t.number}: could not verify its MLflow run {run_id} ({exc})",
                    "left as it is",
                )
            )
            continue
        if problem is None:
            continue
        what = f"trial {t.number} ({t.user_attrs.get(A_CELL, '?')}) is COMPLETE but {problem}"
        findings.append(Finding(what, requeue))
        runs.add(run_id)
        if repair:
            invalid[t.number] = problem
            if run_id in by_id:
                tracker.set_tags(run_id, {TAG_STATE: "INVALID", TAG_REASON: problem})
    if repair and invalid:  # merged into what is there now (another check may have added)
        merged = invalid_trials(study) | invalid
        study.set_user_attr(S_INVALID, {str(k): v for k, v in merged.items()})
    return findings, runs


def study_kind(study: optuna.Study) -> str:
    """``planned`` (grid, random: cells are queued) or ``adaptive`` (tpe: trials are asked)."""
    return "adaptive" if isinstance(study.sampler, optuna.samplers.TPESampler) else "planned"


def _why_invalid(tracker: Tracker, run, run_id: str | None) -> str | None:
    if run_id is None:
        return "it has no MLflow run"
    if run is None:  # not among this experiment's runs: asked by id before calling it gone
        run = tracker.get_run(run_id)
    if run is None:
        return f"its MLflow run {run_id} is gone"
    if run.info.status == RUNNING:
        return None  # still being closed by its (live) worker
    if run.info.status != FINISHED:
        return f"its MLflow run {run_id} is {run.info.status}"
    lacking = [m for m in FINAL_METRICS if m not in run.data.metrics]
    if lacking:
        return f"its MLflow run {run_id} lacks the final metrics ({', '.join(lacking)})"
    missing = [a for a in REQUIRED_ARTIFACTS if a not in tracker.artifact_names(run_id)]
    if missing:
        return f"its MLflow run {run_id} lacks its artifacts ({', '.join(missing)})"
    return None


def _unclaimed_runs(
    study: optuna.Study, tracker: Tracker, runs: list, claimed: set, repair: bool
) -> list[Finding]:
    """FINISHED runs that look complete but no valid COMPLETE trial claims."""
    numbers = {t.number: t for t in study.get_trials(deepcopy=False)}
    findings = []
    for run in runs:
        tags = run.data.tags
        done = run.info.status == FINISHED and tags.get(TAG_STATE, "COMPLETE") == "COMPLETE"
        if not done or run.info.run_id in claimed:
            continue
        trial = numbers.get(int(tags.get("agelab.trial_number", -1)))
        # The same planned trial, whose result is another run (trial numbers are only
        # comparable within one Optuna study: the plan key tells).
        duplicate = (
            trial is not None
            and trial.user_attrs.get(A_KEY) == tags.get("agelab.plan_key")
            and trial.user_attrs.get(A_RUN) not in (None, run.info.run_id)
        )
        state = "DUPLICATE" if duplicate else "ORPHAN"
        reason = (
            f"trial {trial.number}'s result is another run" if duplicate
            else "no COMPLETE trial in the Optuna study claims it (journal lost or rolled back?)"
        )  # fmt: skip
        findings.append(
            Finding(
                f"run {run.info.run_id} ({run.info.run_name}): {reason}",
                f"tagged {state} and left out of reports (kept in MLflow)",
            )
        )
        if repair:
            tracker.set_tags(run.info.run_id, {TAG_STATE: state, TAG_REASON: reason})
    return findings


def summary(findings: list[Finding], repaired: bool) -> list[str]:
    """Lines for the terminal."""
    if not findings:
        return ["check: Optuna and MLflow agree"]
    verb = "" if repaired else " (dry run: nothing changed)"
    return [f"check: {len(findings)} finding(s){verb}:"] + [
        f"  - {f.problem}: {f.action if repaired else 'would be: ' + f.action}" for f in findings
    ]


def check_study(cfg: StudyConfig, *, repair: bool = True) -> list[str]:
    """``agelab check``: recover dead workers' trials, compare the stores, say what was done.

    ``cfg.name`` is the exact study (version) name; the caller resolves versions."""
    from agelab.study.plan import recover
    from agelab.study.store import open_storage, plan_lock, storage_url

    storage = open_storage(storage_url(cfg))
    if cfg.name not in optuna.get_all_study_names(storage):
        raise StoreError(
            f"no study {cfg.name!r} in the Optuna storage {mask_uri(storage_url(cfg))}; "
            "check the name (versions are <name>.v2, ...) or tracking.root / --root"
        )
    study = optuna.load_study(study_name=cfg.name, storage=storage)
    tracker = Tracker(cfg.tracking, cfg.tracking.experiment or cfg.name, create=False)
    with plan_lock(cfg):
        recovered = recover(study, tracker) if repair else 0
        findings = check(study, tracker, repair=repair)
    lines = [f"recovered {recovered} trial(s) of dead workers"] if recovered else []
    return lines + summary(findings, repaired=repair)

"""The analysis: everything the report says, as a pure function of a runs table.

:func:`analyse` takes one row per trial (see :func:`agelab.report.design.runs_table`) and the
study's :class:`~agelab.report.design.Design`, and returns an :class:`Analysis`: per-cell
intervals, the ANOVA, paired comparisons, **one Holm family** over every test the report may
call significant, the coverage rule of thumb, the best cell and what is missing, and the
verdict sentences made from those numbers only. Tests plant effects in synthetic tables and
check the report recovers them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from agelab.report.design import CELL_METRICS, Design, cell_label, normalise_runs
from agelab.report.stats import (
    anova_table,
    coverage_summary,
    holm,
    paired_comparisons,
    t_interval,
)
from agelab.report.verdict import verdict


@dataclass
class Analysis:
    design: Design
    runs: pd.DataFrame  # every planned trial's row (all states)
    cells: pd.DataFrame
    anova: pd.DataFrame | None
    anova_note: str
    regression: pd.DataFrame | None
    comparisons: pd.DataFrame
    simple_effects: pd.DataFrame
    coverage: dict[str, Any]
    best: dict[str, Any] | None
    missing: list[str]
    verdict: list[str]
    importances: dict[str, float] | None = None
    excluded: list[str] = field(default_factory=list)  # runs left out, and why
    alpha: float = 0.05
    confidence: float = 0.95

    @property
    def complete(self) -> pd.DataFrame:
        return self.runs[self.runs["state"] == "COMPLETE"]

    def significant(self) -> list[str]:
        """Every effect the report calls significant (for tests and summaries)."""
        out = []
        if self.anova is not None:
            out += [f"anova:{t}" for t in self.anova.loc[self.anova["significant"], "term"]]
        sig = self.comparisons[self.comparisons["significant"]]
        out += [f"{r.factor}:{r.level_b}-{r.level_a}" for r in sig.itertuples()]
        return out


def analyse(
    runs: pd.DataFrame,
    design: Design,
    *,
    alpha: float = 0.05,
    confidence: float = 0.95,
    importances: dict[str, float] | None = None,
    excluded: list[str] | None = None,
) -> Analysis:
    """Everything the report says, from a runs table (one row per trial) and the design."""
    df = normalise_runs(runs, design)
    complete = df[(df["state"] == "COMPLETE") & np.isfinite(df["mae"].astype(float))]
    cells = cell_table(df, design, confidence)
    anova, note, regression = anova_table(complete, design)
    comparisons, simple = paired_comparisons(complete, design, confidence)

    # One family: every test the report may call significant.
    # The seed block is a nuisance term: shown, never tested.
    tested = [] if anova is None else anova.loc[~anova["block"], "p"].tolist()
    adjusted = holm(tested + comparisons["p"].tolist())
    n_anova = len(tested)
    if anova is not None:
        anova["p_holm"] = math.nan
        anova.loc[~anova["block"], "p_holm"] = adjusted[:n_anova]
        anova["significant"] = anova["p_holm"] < alpha
    comparisons["p_holm"] = adjusted[n_anova:]
    comparisons["significant"] = comparisons["p_holm"] < alpha

    out = Analysis(
        design=design,
        runs=df,
        cells=cells,
        anova=anova,
        anova_note=note,
        regression=regression,
        comparisons=comparisons,
        simple_effects=simple,
        coverage=coverage_summary(complete, confidence),
        best=best_cell(cells, complete, design),
        missing=missing_report(df, cells, design),
        verdict=[],
        importances=importances,
        alpha=alpha,
        confidence=confidence,
        excluded=list(excluded or []),
    )
    out.verdict = verdict(out)
    return out


def cell_table(df: pd.DataFrame, design: Design, confidence: float) -> pd.DataFrame:
    """One row per cell (planned grid cells included even with nothing complete)."""
    keys = design.keys
    groups: dict[tuple, pd.DataFrame] = (
        {
            (k if isinstance(k, tuple) else (k,)): g
            for k, g in df.groupby(keys, sort=False, dropna=False)
        }
        if keys
        else {(): df}
    )
    if design.sampler == "grid" and design.factors and not design.numeric:
        for combo in itertools.product(*(design.levels[f] for f in design.factors)):
            groups.setdefault(tuple(combo), df.iloc[0:0])
    rows = []
    for key, g in groups.items():
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        done = g[(g["state"] == "COMPLETE") & np.isfinite(g["mae"].astype(float))]
        row["cell"] = cell_label(row, keys, design) if keys else "all runs"
        row["n"] = len(done)
        row["seeds"] = sorted(done["seed"].tolist(), key=str)
        for state in ("FAIL", "PRUNED", "KILLED", "RUNNING"):
            row[state.lower()] = int((g["state"] == state).sum())
        row["retried"] = int(g["attempts"].sum() - len(g))
        for metric, _ in CELL_METRICS:
            mean, lo, hi, _n = t_interval(done[metric], confidence)
            if "coverage" in metric:  # a share: the interval cannot leave [0, 1]
                lo, hi = max(lo, 0.0), min(hi, 1.0)
            row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"] = mean, lo, hi
        # The objective: best_calib_mae (calib_mae's latest value is the last epoch's).
        calib = done["best_calib_mae"].where(done["best_calib_mae"].notna(), done["calib_mae"])
        row["calib_mae"] = float(calib.astype(float).mean()) if len(done) else math.nan
        verdicts = done["verdict"].fillna("").replace("", "n/a").value_counts()
        row["verdicts"] = ", ".join(f"{v} {c}" for v, c in verdicts.items())
        rows.append(row)
    cells = pd.DataFrame(rows)
    return cells.sort_values(["mae", "cell"], na_position="last").reset_index(drop=True)


def best_cell(cells: pd.DataFrame, complete: pd.DataFrame, design: Design) -> dict[str, Any] | None:
    """Best cell by mean calib MAE (test MAE when calib is missing) and its runner-up."""
    done = cells[cells["n"] > 0].copy()
    if done.empty:
        return None
    by = "calib_mae" if done["calib_mae"].notna().all() else "mae"
    done = done.sort_values([by, "mae"]).reset_index(drop=True)
    best = done.iloc[0].to_dict()
    out: dict[str, Any] = {"by": by, "best": best, "runner_up": None, "distinguishable": None}
    out["order"] = done["cell"].tolist()  # best first, worst last (same ranking everywhere)
    if len(done) > 1:
        runner = done.iloc[1].to_dict()
        out["runner_up"] = runner
        if any(math.isnan(x) for x in (best["mae_lo"], runner["mae_lo"])):
            out["distinguishable"] = None  # no intervals: cannot say
        else:
            overlap = best["mae_lo"] <= runner["mae_hi"] and runner["mae_lo"] <= best["mae_hi"]
            out["distinguishable"] = not overlap
    return out


def missing_report(df: pd.DataFrame, cells: pd.DataFrame, design: Design) -> list[str]:
    """What the study lacks: cells with no result, missing replicates, failures."""
    out = []
    n_complete = int((df["state"] == "COMPLETE").sum())
    if design.planned is not None and n_complete < design.planned:
        out.append(
            f"{design.planned - n_complete} of {design.planned} planned trials have no result"
        )
    for c in cells.itertuples():
        problems = []
        if c.n == 0:
            problems.append("no completed run")
        elif design.sampler == "grid" and design.seeds and c.n < len(design.seeds):
            have = {str(s) for s in c.seeds}
            lack = [str(s) for s in design.seeds if str(s) not in have]
            problems.append(f"missing seed(s) {', '.join(lack)}")
        for state in ("fail", "pruned", "killed", "running"):
            k = getattr(c, state)
            if k:
                problems.append(f"{k} {state if state != 'fail' else 'failed'}")
        if problems:
            out.append(f"{c.cell}: {'; '.join(problems)}")
    reasons = df.loc[df["state"] == "FAIL", "reason"].fillna("").replace("", "no reason")
    for reason, k in reasons.value_counts().items():
        out.append(f"failure reason ({k}×): {str(reason)[:200]}")
    return out

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

from agelab.metrics import calibration_split
from agelab.report.design import (
    CELL_METRICS,
    Design,
    cell_label,
    normalise_runs,
)
from agelab.report.stats import (
    anova_table,
    cell_pair_test,
    coverage_summary,
    geometric_t_interval,
    holm,
    paired_comparisons,
    power_of,
    shape_summary,
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
    min_effect: float = 0.25  # years: the effect the power statements are about
    power: float = 0.8
    family_size: int = 0  # tests in the one Holm family
    n_splits: int = 0  # distinct data.split.seed values among the completed runs (0: unknown)

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
        test = (self.best or {}).get("test") or {}
        if test.get("significant"):
            out.append(f"best:{self.best['runner_up']['cell']}-{self.best['best']['cell']}")
        return out

    @property
    def power_alpha(self) -> float:
        """The level of the power statements: alpha / (tests in the family). A p-value below
        it is rejected by Holm whatever the family's other p-values are (Bonferroni's bound,
        which Holm never does worse than), so it is the level a planned replication can
        count on."""
        return self.alpha / max(self.family_size, 1)


def analyse(
    runs: pd.DataFrame,
    design: Design,
    *,
    alpha: float = 0.05,
    confidence: float = 0.95,
    importances: dict[str, float] | None = None,
    excluded: list[str] | None = None,
    min_effect: float = 0.25,
    power: float = 0.8,
) -> Analysis:
    """Everything the report says, from a runs table (one row per trial) and the design."""
    df = normalise_runs(runs, design)
    complete = df[(df["state"] == "COMPLETE") & np.isfinite(df["mae"].astype(float))]
    cells = cell_table(df, design, confidence)
    anova, note, regression = anova_table(complete, design)
    comparisons, simple = paired_comparisons(complete, design, confidence)
    best = best_cell(cells, complete, design, confidence)
    family_size = holm_family(anova, comparisons, best, alpha)
    coverage = coverage_summary(complete, confidence)
    coverage["shape"] = shape_summary(complete, confidence)
    splits = complete["split_seed"].dropna().astype(str)
    out = Analysis(
        design=design,
        runs=df,
        cells=cells,
        anova=anova,
        anova_note=note,
        regression=regression,
        comparisons=comparisons,
        simple_effects=simple,
        coverage=coverage,
        best=best,
        missing=missing_report(df, cells, design),
        verdict=[],
        importances=importances,
        alpha=alpha,
        confidence=confidence,
        excluded=list(excluded or []),
        min_effect=min_effect,
        power=power,
        family_size=family_size,
        n_splits=int(splits.nunique()) if len(splits) == len(complete) else 0,
    )
    add_power(out)
    if best is not None:
        best["pm"] = pm_numbers(complete, best["best"], design)
    out.verdict = verdict(out)
    return out


def holm_family(
    anova: pd.DataFrame | None,
    comparisons: pd.DataFrame,
    best: dict[str, Any] | None,
    alpha: float,
) -> int:
    """Holm-adjust, as **one family**, every test the report may call significant: the ANOVA
    effects and interactions (the seed block is a nuisance term: shown, never tested), the
    pooled paired comparisons and the best cell against its runner-up. Writes ``p_holm`` and
    ``significant`` into each; returns the family's size (finite p-values)."""
    tested = [] if anova is None else anova.loc[~anova["block"], "p"].tolist()
    test = (best or {}).get("test")
    best_p = [test["p"]] if test else []
    raw = tested + comparisons["p"].tolist() + best_p
    adjusted = holm(raw)
    n_anova, n_comp = len(tested), len(comparisons)
    if anova is not None:
        anova["p_holm"] = math.nan
        anova.loc[~anova["block"], "p_holm"] = adjusted[:n_anova]
        anova["significant"] = anova["p_holm"] < alpha
    comparisons["p_holm"] = adjusted[n_anova : n_anova + n_comp]
    comparisons["significant"] = comparisons["p_holm"] < alpha
    if test:
        test["p_holm"] = adjusted[-1]
        test["significant"] = bool(test["p_holm"] < alpha)
    return int(np.isfinite(np.asarray(raw, dtype=float)).sum())


def add_power(a: Analysis) -> None:
    """For every paired test the report could not decide (testable, not significant): the
    difference its pairs could detect with ``a.power``, and about how many seeds would detect
    ``a.min_effect`` years, both at :attr:`Analysis.power_alpha`."""
    comp = a.comparisons
    kw = {"alpha": a.power_alpha, "power": a.power, "min_effect": a.min_effect}
    rows = [
        power_of(r.sd, int(r.n_pairs), int(r.n_seeds), **kw)
        if _undecided(r.p_holm, r.significant)
        else {"mde": math.nan, "seeds_needed": math.nan}
        for r in comp.itertuples()
    ]
    comp["mde"] = [r["mde"] for r in rows]
    comp["seeds_needed"] = [r["seeds_needed"] for r in rows]
    test = (a.best or {}).get("test")
    if test and _undecided(test["p_holm"], test["significant"]):
        test |= power_of(test["sd"], test["n_pairs"], test["n_seeds"], **kw)


def _undecided(p_holm: float, significant: bool) -> bool:
    return bool(math.isfinite(p_holm) and not significant)


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
            average = geometric_t_interval if metric == "shape_beta" else t_interval
            mean, lo, hi, _n = average(done[metric], confidence)
            if "coverage" in metric:  # a share: the interval cannot leave [0, 1]
                lo, hi = max(lo, 0.0), min(hi, 1.0)
            elif lo < 0:  # MAE, widths, β: positive quantities
                lo = 0.0
            row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"] = mean, lo, hi
        # The objective: best_calib_mae (calib_mae's latest value is the last epoch's).
        calib = done["best_calib_mae"].where(done["best_calib_mae"].notna(), done["calib_mae"])
        row["calib_mae"] = float(calib.astype(float).mean()) if len(done) else math.nan
        verdicts = done["verdict"].fillna("").replace("", "n/a").value_counts()
        row["verdicts"] = ", ".join(f"{v} {c}" for v, c in verdicts.items())
        rows.append(row)
    cells = pd.DataFrame(rows)
    return cells.sort_values(["mae", "cell"], na_position="last").reset_index(drop=True)


def best_cell(
    cells: pd.DataFrame, complete: pd.DataFrame, design: Design, confidence: float
) -> dict[str, Any] | None:
    """Best cell by the objective (mean calib MAE) and its runner-up, tested paired on seed.

    Cells whose runs logged no calib MAE are left out of the ranking and named
    (``unranked``). Only when no cell has one are the cells ranked by test MAE; then the
    runner-up is not tested, since the numbers that ranked the two would also test them.
    Otherwise ``test`` is :func:`~agelab.report.stats.cell_pair_test` (test MAE, runner-up −
    best), which :func:`holm_family` adds to the report's one Holm family."""
    done = cells[cells["n"] > 0].copy()
    if done.empty:
        return None
    has_calib = done["calib_mae"].notna()
    by = "calib_mae" if has_calib.any() else "mae"
    ranked = done[has_calib] if has_calib.any() else done
    ranked = ranked.sort_values([by, "mae", "cell"]).reset_index(drop=True)
    out: dict[str, Any] = {
        "by": by,
        "best": ranked.iloc[0].to_dict(),
        "runner_up": None,
        "test": None,
        "unranked": done.loc[~has_calib, "cell"].tolist() if has_calib.any() else [],
        "order": ranked["cell"].tolist(),  # best first, worst last (same ranking everywhere)
    }
    if len(ranked) > 1:
        out["runner_up"] = ranked.iloc[1].to_dict()
        if by == "calib_mae":
            out["test"] = cell_pair_test(
                complete, design, out["best"], out["runner_up"], confidence
            )
    return out


def pm_numbers(complete: pd.DataFrame, best: dict[str, Any], design: Design) -> dict[str, Any]:
    """The best cell's runs' errors in a product manager's terms, averaged over its runs:
    years within which 50 % and 80 % of test faces fall (observed) and the split-conformal
    90 % half-width (``conformal_90_width`` is the full width 2q) with its test coverage,
    and what the intervals were calibrated on: the conformal split (``n`` faces, none of
    which chose anything) or, in runs without one, the calib split, which chose the epoch."""
    mask = np.ones(len(complete), dtype=bool)
    for k in design.keys:
        mask &= (complete[k].astype(str) == str(best[k])).to_numpy()
    runs = complete[mask]

    def mean(col: str) -> float:
        x = runs[col].astype(float) if col in runs else pd.Series(dtype=float)
        x = x[np.isfinite(x)]
        return float(x.mean()) if len(x) else math.nan

    width = runs["conformal_90_width"].astype(float) if "conformal_90_width" in runs else None
    unbounded = int(np.isposinf(width).sum()) if width is not None else 0
    n_conf = runs["n_conformal_split"].astype(float)
    # NaN (runs logged before the conformal split existed) counts as calib
    on_calib = np.array([calibration_split(n) == "calib" for n in n_conf], dtype=bool)
    calibrated = np.where(on_calib, runs["n_calib_split"].astype(float), n_conf)
    calibrated = calibrated[np.isfinite(calibrated)]
    return {
        "n": len(runs),
        "years_50": mean("years_for_50"),
        "years_80": mean("years_for_80"),
        # too few calibration points in any run: no finite interval to promise
        "conformal_90_half": math.inf if unbounded else mean("conformal_90_width") / 2.0,
        "conformal_90_unbounded": unbounded,
        "conformal_90_coverage": mean("conformal_90_coverage"),
        "conformal_n": int(np.median(calibrated)) if len(calibrated) else 0,
        "conformal_on_calib": int(on_calib.sum()),
    }


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

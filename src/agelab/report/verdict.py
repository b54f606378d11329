"""The verdict: plain sentences, each backed by a number in the report's tables.

A sentence never says more than its test supports: a significant effect gets its direction,
size, interval and Holm-adjusted p; anything else is "no detectable difference" (flagged
"borderline" when only the unadjusted interval excludes 0); a disagreement between the ANOVA
and the paired test is said as such, not turned into a claim.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from agelab.metrics import LAPLACE_CS_AT_MAE, NORMAL_CS_AT_MAE
from agelab.report.design import STATES, VARIES
from agelab.report.text import conf_label, format_p, pct, years

if TYPE_CHECKING:
    from agelab.report.analysis import Analysis

#: What the coverage rule of thumb concludes, by :func:`coverage_summary`'s ``fits``.
# Below this many pairs the standard deviation behind a power figure is too uncertain to
# quote it plainly (with 3 pairs its 90 % interval spans a factor of about 6).
ROUGH_PAIRS = 4

COVERAGE_FITS = {
    "normal": "consistent with normal residuals, not with Laplace",
    "laplace": "consistent with Laplace residuals, not with normal",
    "both": "the interval contains both predictions: cannot tell them apart",
    "between": "between the two predictions, consistent with neither",
    "below": "below both predictions: fewer errors fall within the MAE than normal or "
    "Laplace residuals would give (look for bias or a spread-out error distribution)",
    "above": "above both predictions: errors are more concentrated than even Laplace "
    "residuals give (a sharp peak with heavy tails)",
    "too few runs": "one run only: no interval",
}


def verdict(a: Analysis) -> list[str]:
    """The report's sentences, in reading order."""
    out = [_scope(a)]
    if not (a.runs["state"] == "COMPLETE").any():
        out.append("No trial has completed yet: nothing can be concluded.")
        return out
    out += _single_replicates(a)
    out += [_comparison(a, r) for r in a.comparisons.itertuples()]
    out += _anova_sentences(a)
    out += _importances(a)
    out += _best(a)
    out += _coverage(a)
    if len(a.complete) and a.complete["mae"].notna().any() and a.design.sampler == "tpe":
        out.append(
            "TPE chooses cells adaptively: cells are not replicated evenly, so comparisons "
            "rest on whatever pairs it happened to run."
        )
    return out


def _n_cells(a: Analysis) -> int:
    return int((a.cells["n"] > 0).sum())


def _scope(a: Analysis) -> str:
    """How many trials the conclusions rest on, and what was lost."""
    counts = {s: int((a.runs["state"] == s).sum()) for s in STATES}
    planned = a.design.planned
    scope = (
        f"Based on {counts['COMPLETE']} completed trial(s) in {_n_cells(a)} cell(s)"
        + (f" of {planned} planned" if planned else "")
        + "."
    )
    lost = [
        f"{counts[s]} {w}"
        for s, w in (
            ("FAIL", "failed"),
            ("PRUNED", "pruned"),
            ("KILLED", "lost to a crash"),
            ("RUNNING", "still running"),
        )
        if counts[s]
    ]
    if lost:
        scope = scope[:-1] + f"; {', '.join(lost)}."
    if a.excluded:
        scope += f" Left out: {'; '.join(a.excluded)}."
    return scope


def _single_replicates(a: Analysis) -> list[str]:
    single = a.cells[(a.cells["n"] == 1)]
    if not len(single):
        return []
    return [
        f"{len(single)} of {_n_cells(a)} cell(s) have a single replicate: no confidence interval "
        "for them, and comparisons rest only on pairs across the other factors — add seeds "
        "(search.seeds) to replicate."
    ]


def _comparison(a: Analysis, r: Any) -> str:
    """One paired comparison (pooled over the other factors and seeds)."""
    c = conf_label(a.confidence)
    what = f"{r.factor} = {r.level_b} instead of {r.level_a}"
    if r.n_pairs >= 2 and not math.isfinite(r.p) and math.isfinite(r.diff):
        return (
            f"{what}: all {r.n_pairs} matched pairs differ by exactly {r.diff:+.2f} years — "
            "no variation to test (identical runs?)."
        )
    if r.n_pairs < 2 or not math.isfinite(r.p):
        return (
            f"{what}: cannot be tested — {r.n_pairs} matched pair(s) "
            "(same seed and other choices); add replicates."
        )
    basis = f"{r.n_pairs} pairs" + (f": {r.strata}" if r.strata else "")
    if r.significant:
        direction = "lowered" if r.diff < 0 else "raised"
        lo, hi = (-r.hi, -r.lo) if r.diff < 0 else (r.lo, r.hi)
        return (
            f"{what} {direction} test MAE by {years(abs(r.diff))} years ({c} CI "
            f"{years(lo)} to {years(hi)}, Holm-adjusted {format_p(r.p_holm)}, {basis})."
        )
    text = (
        f"{what}: no detectable difference in test MAE ({r.diff:+.2f} years, {c} CI "
        f"{years(r.lo)} to {years(r.hi)}, Holm-adjusted {format_p(r.p_holm)}, {basis})"
    )
    if r.lo > 0 or r.hi < 0:
        text += (
            "; the unadjusted interval excludes 0, but the difference does not survive the "
            "correction for the report's other tests: borderline, replicate before relying "
            "on it"
        )
    text += _anova_disagrees(a, r.factor)
    return text + power_clause(a, r.mde, r.seeds_needed, int(r.n_seeds), int(r.n_pairs)) + "."


def power_level(a: Analysis) -> str:
    """The level of the power statements, as the report writes it: ``0.05/10 = 0.005``."""
    if a.family_size <= 1:
        return f"{a.alpha:g}"
    return f"{a.alpha:g}/{a.family_size} = {a.power_alpha:.2g}"


def power_clause(a: Analysis, mde: float, seeds_needed: float, n_seeds: int, n_pairs: int) -> str:
    """What an undecided paired test could have found: "; 3 seeds had 80 % power (…) only for
    differences of at least 0.61 years; about 12 seeds would detect 0.25 years" ('' if
    unknown). With fewer than ``ROUGH_PAIRS`` pairs the spread of the differences is itself a
    guess, so both figures are said to be rough and the seed count a lower bound."""
    if not isinstance(mde, float | int) or math.isnan(mde):
        return ""
    basis = f"{n_seeds} seed{'s' if n_seeds != 1 else ''}"
    if n_pairs != n_seeds:
        basis += f" ({n_pairs} pairs)"
    how = f"two-sided, level {power_level(a)}"
    effect = f"{a.min_effect:g} years"
    if not math.isfinite(mde):
        return f"; {basis} are too few to detect any difference ({how}), add seeds"
    text = (
        f"; {basis} had {100 * a.power:.0f} % power ({how}) only for differences of at least "
        f"{years(mde)} years"
    )
    rough = n_pairs < ROUGH_PAIRS
    if rough:
        text += f" (rough: the spread of the differences is estimated from {n_pairs} pairs)"
    if mde <= a.min_effect:
        return text + f", so a difference of {effect} would likely have been found"
    if not math.isfinite(seeds_needed):
        return text + f"; detecting {effect} would take more seeds than is practical"
    need = f"at least {int(seeds_needed)}" if rough else f"about {int(seeds_needed)}"
    return text + f"; {need} seeds would detect {effect}"


def _anova_disagrees(a: Analysis, factor: str) -> str:
    """When the paired test finds nothing but the ANOVA finds a main effect of ``factor``."""
    if a.anova is None:
        return ""
    hit = a.anova[(a.anova["term"] == factor) & a.anova["significant"]]
    if hit.empty:
        return ""
    main = hit.iloc[0]
    interacts = a.anova[
        a.anova["interaction"]
        & a.anova["significant"]
        & a.anova["term"].str.split(" × ").apply(lambda t: factor in t)
    ]
    text = (
        f"; the ANOVA does detect an effect of {factor} (F-test, Holm-adjusted "
        f"{format_p(main['p_holm'])}, η² = {main['eta_sq']:.2f})"
    )
    if len(interacts):
        return text + (
            f", whose size depends on {', '.join(interacts['term'])}: see the per-level comparisons"
        )
    return text + ": the two tests disagree, so the evidence is borderline"


def _anova_sentences(a: Analysis) -> list[str]:
    """Interactions, then the ANOVA terms no paired comparison spoke about."""
    if a.anova is None:
        return [f"No ANOVA: {a.anova_note}."] if a.anova_note else []
    out = []
    inter = a.anova[a.anova["interaction"]]
    for r in inter.itertuples():
        if r.significant:
            out.append(_interaction(a, r))
    quiet = inter[~inter["significant"]]
    if len(quiet):
        out.append(
            "No detectable interaction: "
            + ", ".join(quiet["term"])
            + f" (smallest Holm-adjusted {format_p(float(quiet['p_holm'].min()))})."
        )
    tested = set(a.comparisons["factor"])
    for r in a.anova[~a.anova["interaction"] & ~a.anova["block"]].itertuples():
        if r.term in tested:
            continue  # said above, with its paired comparison
        # Numeric covariates, and factors without matched pairs (random search).
        if r.significant:
            out.append(
                f"{r.term} affects test MAE (F-test, Holm-adjusted {format_p(r.p_holm)}, "
                f"η² = {r.eta_sq:.2f})."
            )
        else:
            out.append(
                f"{r.term}: no detectable effect on test MAE (F-test, Holm-adjusted "
                f"{format_p(r.p_holm)})."
            )
    return out


def _interaction(a: Analysis, r: Any) -> str:
    """A significant interaction, with the per-level differences where the effect lives."""
    f1, f2 = r.term.split(" × ")
    parts = a.simple_effects[
        (a.simple_effects["factor"] == f1) & a.simple_effects["at"].str.startswith(f2 + "=")
    ]
    detail = "; ".join(
        f"at {s.at}: {s.level_b} − {s.level_a} = {s.diff:+.2f} ({years(s.lo)} to {years(s.hi)})"
        for s in parts.itertuples()
    )
    return (
        f"The effect of {f1} depends on {f2} (interaction F-test, Holm-adjusted "
        f"{format_p(r.p_holm)}, η² = {r.eta_sq:.2f})" + (f": {detail}." if detail else ".")
    )


def _importances(a: Analysis) -> list[str]:
    if not a.importances:
        return []
    top = sorted(a.importances.items(), key=lambda kv: -kv[1])
    return [
        "fANOVA importance for test MAE: "
        + ", ".join(f"{a.design.label(k)} {v:.2f}" for k, v in top)
        + " (descriptive: no test behind it)."
    ]


def _best(a: Analysis) -> list[str]:
    """The best cell by the objective, how it stands against the runner-up (a paired test in
    the report's Holm family), and its errors in plain terms."""
    b = a.best
    if not b:
        return []
    c = conf_label(a.confidence)
    best = b["best"]
    text = ""
    if b["by"] == "mae":
        text = (
            "No run logged a calib MAE (the objective), so cells are ranked by test MAE "
            "instead: the split they are also measured on, which flatters the best cell. "
        )
    by = "calib MAE" if b["by"] == "calib_mae" else "test MAE"
    ci = (
        f", {c} CI {years(best['mae_lo'])}–{years(best['mae_hi'])}"
        if math.isfinite(best["mae_lo"])
        else ""
    )
    text += (
        f"Best cell by {by}: {best['cell']}, test MAE {years(best['mae'])} years{ci} "
        f"({best['n']} replicate(s))."
    )
    if b["unranked"]:
        text += (
            f" Not ranked: {len(b['unranked'])} cell(s) whose runs logged no calib MAE "
            f"({', '.join(b['unranked'])})."
        )
    if b["runner_up"] is not None:
        text += " " + _runner_up(a, b["runner_up"], b["test"])
    return [text, *_pm(a)]


def _runner_up(a: Analysis, runner: dict[str, Any], test: dict[str, Any] | None) -> str:
    """The runner-up against the best cell: decided by the paired test on test MAE (runner-up
    − best, same seeds, Holm-adjusted with the report's other tests), never by overlap."""
    name = f"{runner['cell']} ({years(runner['mae'])})"
    if test is None:
        return (
            f"Runner-up {name} is not tested against it: the test MAE that ranked the two "
            "would also test them."
        )
    if test["n_pairs"] < 2:
        return (
            f"Runner-up {name}: too few replicates to tell them apart ({test['n_pairs']} "
            "seed(s) shared)."
        )
    if not math.isfinite(test["p"]):
        return (
            f"Runner-up {name}: on all {test['n_pairs']} shared seeds it differs by exactly "
            f"{test['diff']:+.2f} years — no variation to test (identical runs?)."
        )
    c = conf_label(a.confidence)
    names = test["differs"] or ["nothing searched"]
    differs = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    basis = (
        f"{c} CI {years(test['lo'])} to {years(test['hi'])}, Holm-adjusted "
        f"{format_p(test['p_holm'])}, paired over {test['n_pairs']} seeds; the cells differ "
        f"in {differs}"
    )
    if test["significant"] and test["diff"] > 0:
        return (
            f"It is ahead of the runner-up {name} on test MAE by {years(test['diff'])} years "
            f"({basis})."
        )
    if test["significant"]:
        return (
            f"But the runner-up {name} has the lower test MAE, by {years(-test['diff'])} years "
            f"({basis}): the calib ranking does not carry over to the test split."
        )
    return (
        f"Runner-up {name} is not distinguishable from it on test MAE ({test['diff']:+.2f} "
        f"years, {basis})"
        + power_clause(a, test.get("mde", math.nan), test.get("seeds_needed", math.nan),
                       test["n_pairs"], test["n_pairs"])
        + "."
    )  # fmt: skip


def _pm(a: Analysis) -> list[str]:
    """The best cell's errors as a product manager reads them."""
    pm = (a.best or {}).get("pm") or {}
    parts = []
    if math.isfinite(pm.get("years_50", math.nan)):
        parts.append(f"half of the faces within {years(pm['years_50'])} years")
    if math.isfinite(pm.get("years_80", math.nan)):
        parts.append(f"80 % within {years(pm['years_80'])}")
    half = pm.get("conformal_90_half", math.nan)
    if half == math.inf:
        parts.append(
            f"no finite 90 % conformal interval ({pm['conformal_90_unbounded']} run(s) had too "
            "few calibration faces for one)"
        )
    elif math.isfinite(half):
        seen = pm.get("conformal_90_coverage", math.nan)
        n_cal, on_calib = pm.get("conformal_n", 0), pm.get("conformal_on_calib", 0)
        faces = f"{n_cal} faces" + (" a run" if pm["n"] > 1 else "") if n_cal else "its faces"
        if on_calib:
            # calib chose the epoch: its errors are a little optimistic, no promise holds
            how = (
                f"split-conformal calibrated on the calib split ({faces}"
                + (f"; {on_calib} of {pm['n']} runs" if on_calib < pm["n"] else "")
                + "), which also chose the epoch, so the 90 % may be a little optimistic"
            )
        else:
            how = (
                f"split-conformal, calibrated on {faces} that chose nothing: for new faces "
                "like them, 90 % on average, over calibration sets of that size"
            )
        parts.append(
            f"90 % within ±{years(half)} ({how}"
            + (f"; it covered {pct(seen)} of the test faces" if math.isfinite(seen) else "")
            + ")"
        )
    if not parts:
        return []
    runs = f"mean of its {pm['n']} runs" if pm["n"] > 1 else "its one run"
    return [f"In plain terms, the best cell ({runs}, test split): {', '.join(parts)}."]


def _coverage(a: Analysis) -> list[str]:
    """The coverage rule of thumb: observed share within the MAE vs normal and Laplace."""
    cov = a.coverage
    if not cov["n"]:
        return []
    fits = COVERAGE_FITS[cov["fits"]]
    ci = (
        f" ({conf_label(a.confidence)} CI {pct(cov['lo'])}–{pct(cov['hi'])})"
        if cov["n"] > 1
        else ""
    )
    vs = ", ".join(f"{k} {v}" for k, v in cov["verdicts"].items())
    return [
        f"Across {cov['n']} run(s) the share of test errors within the MAE averaged "
        f"{pct(cov['mean'])}{ci}; normal residuals predict {pct(NORMAL_CS_AT_MAE)}, "
        f"Laplace {pct(LAPLACE_CS_AT_MAE)}: {fits}. {cov['closer_to_normal']} of "
        f"{cov['n']} runs are closer to the normal prediction. Per-run shape verdicts: {vs}.",
        *_shape(a),
    ]


def _shape(a: Analysis) -> list[str]:
    """The rule of thumb generalised by the fitted shape β (2 normal, 1 Laplace)."""
    sh = a.coverage.get("shape") or {}
    if not sh.get("n"):
        return []
    ci = (
        f" ({conf_label(a.confidence)} CI {sh['beta_lo']:.2f}–{sh['beta_hi']:.2f})"
        if sh["n"] > 1
        else ""
    )
    return [
        f"Residual shape across {sh['n']} run(s): generalised-normal β, geometric mean "
        f"{sh['beta']:.2f}{ci}, where β = 2 is normal and β = 1 Laplace. With shape "
        f"β ≈ {sh['beta']:.2f}, {pct(sh['predicted'])} fall within the MAE (observed "
        f"{pct(sh['observed'])}); normal predicts {pct(NORMAL_CS_AT_MAE)}, Laplace "
        f"{pct(LAPLACE_CS_AT_MAE)}."
    ]


def replicate_note(a: Analysis) -> str:
    """What a replicate seed varied, so the reader knows what the intervals cover."""
    varies = a.design.replicate_varies
    if varies is None:
        what = (
            "the initialisation, batch order and augmentation only (train.seed): every "
            "replicate used the same data split"
        )
    else:
        what = " and ".join(VARIES.get(v, v) for v in varies)
        if "split" not in varies:
            what += ", not the data split (every replicate used the same one)"
    splits = bool(varies and "split" in varies)
    data_factor = any(f.startswith("data.") for f in (*a.design.factors, *a.design.numeric))
    text = f"A replicate seed varied {what}; every cell of one replicate shares its seed"
    if splits:
        text += (
            " and split (the same faces in each split only where the cells share the data "
            "and split settings, which a data.* factor changes)"
            if data_factor
            else " and split"
        )
    if a.design.sampler == "grid":
        text += ", so pairs stay paired"
    text += ". The intervals over replicates cover that variation only."
    if a.n_splits:
        text += f" The completed runs used {a.n_splits} distinct data split(s)."
    return text

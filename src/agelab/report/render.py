"""Render an :class:`~agelab.report.analysis.Analysis` as ``report.md`` and a self-contained
``report.html``.

Figures are matplotlib :class:`~matplotlib.figure.Figure` objects built without pyplot (as in
:mod:`agelab.plots`), written as PNG next to the markdown and embedded as data URIs in the
HTML, so the HTML file alone is the whole report (mail it, open it from the MLflow UI).
"""

from __future__ import annotations

import base64
import contextlib
import html
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from agelab.metrics import LAPLACE_CS_AT_MAE, NORMAL_CS_AT_MAE
from agelab.plots import COLORS, coverage_vs_beta_figure, save_png
from agelab.report.analysis import Analysis
from agelab.report.design import CELL_METRICS
from agelab.report.stats import t_interval
from agelab.report.text import conf_label, format_p
from agelab.report.verdict import power_level, replicate_note

PREFERRED = ("model.norm", "model.act", "model.backbone")


# ------------------------------------------------------------------------------ numbers


def _num(x: Any, digits: int = 2) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "–" if not math.isfinite(x) else f"{x:.{digits}f}"


def _ci(mean: float, lo: float, hi: float, digits: int = 2, pct: bool = False) -> str:
    k = 100.0 if pct else 1.0
    if not math.isfinite(mean):
        return "–"
    text = _num(mean * k, 1 if pct else digits)
    if math.isfinite(lo) and math.isfinite(hi):
        d = 1 if pct else digits
        text += f" ({_num(lo * k, d)} to {_num(hi * k, d)})"
    return text + (" %" if pct else "")


def _p(p: float) -> str:
    return format_p(p, relation=False)


# ------------------------------------------------------------------------------- tables


Table = tuple[list[str], list[list[str]]]


#: Cell columns whose header names their interval (the others show one too, unlabelled).
CI_IN_HEADER = {"mae", "coverage_at_mae", "coverage_at_5", "shape_beta"}


def _cell_metrics(a: Analysis) -> list[tuple[str, str]]:
    """The cells table's metric columns: shape β only when some run logged it."""
    has_beta = np.isfinite(a.cells["shape_beta"].astype(float)).any()
    return [(m, lb) for m, lb in CELL_METRICS if m != "shape_beta" or has_beta]


def cells_table(a: Analysis) -> Table:
    conf = conf_label(a.confidence)
    metrics = _cell_metrics(a)
    head = ["cell", "n"] + [
        f"{label} ({conf} CI)" if metric in CI_IN_HEADER else label for metric, label in metrics
    ]
    head += ["shape verdicts", "failed / pruned / lost"]
    rows = []
    for c in a.cells.itertuples():
        r = [c.cell, str(c.n)]
        for metric, _ in metrics:
            pct = "coverage" in metric
            r.append(
                _ci(
                    getattr(c, metric),
                    getattr(c, f"{metric}_lo"),
                    getattr(c, f"{metric}_hi"),
                    pct=pct,
                )
            )
        r += [c.verdicts if c.n else "", f"{c.fail} / {c.pruned} / {c.killed + c.running}"]
        rows.append(r)
    return head, rows


def cells_note(a: Analysis) -> str:
    """Under the cells table: what its intervals are over, and what a replicate varied."""
    text = (
        f"Intervals are two-sided {conf_label(a.confidence)} t-intervals over the cell's "
        "replicates. " + replicate_note(a)
    )
    if "shape_beta" in dict(_cell_metrics(a)):
        text += (
            " Shape β is the fitted generalised-normal shape of each run's test residuals "
            "(2 normal, 1 Laplace); its centre and interval are the geometric mean and a "
            "t-interval on the log scale over the replicates."
        )
    return text


def anova_rows(a: Analysis) -> Table:
    head = ["term", "df", "F", "p", "p (Holm)", "η²", "partial η²", "significant"]
    rows = [
        [
            r.term,
            _num(r.df, 0),
            _num(r.F),
            _p(r.p),
            _p(r.p_holm),
            _num(r.eta_sq, 3),
            _num(r.partial_eta_sq, 3),
            "yes" if r.significant else "no",
        ]
        for r in a.anova.itertuples()
    ]
    return head, rows


def regression_rows(a: Analysis) -> Table:
    head = ["term", "coefficient (years)", f"{conf_label(a.confidence)} CI", "p"]
    rows = [
        [r.term, _num(r.coef, 3), f"{_num(r.lo, 3)} to {_num(r.hi, 3)}", _p(r.p)]
        for r in a.regression.itertuples()
    ]
    return head, rows


def comparison_rows(a: Analysis) -> Table:
    """The pooled paired comparisons, with what the undecided ones could have detected."""
    power = f"{100 * a.power:.0f} % power"
    head = [
        "factor",
        "comparison (b − a)",
        "pairs",
        "mean difference (years)",
        f"{conf_label(a.confidence)} CI",
        "p",
        "p (Holm)",
        "significant",
        "paired over",
        f"detectable at {power} (years)",
        f"seeds to detect {a.min_effect:g} y",
    ]
    rows = [
        [
            r.factor,
            f"{r.level_b} − {r.level_a}",
            str(r.n_pairs),
            _num(r.diff),
            f"{_num(r.lo)} to {_num(r.hi)}",
            _p(r.p),
            _p(r.p_holm),
            "yes" if r.significant else "no",
            r.strata,
            _num(r.mde),
            _seeds(r.seeds_needed),
        ]
        for r in a.comparisons.itertuples()
    ]
    return head, rows


def power_note(a: Analysis) -> str:
    return (
        f"For each comparison not found significant: the smallest difference its pairs could "
        f"detect with {100 * a.power:.0f} % power (two-sided paired t-test, from the observed "
        f"spread of the differences, at level {power_level(a)}), and about how many replicate "
        f"seeds would detect {a.min_effect:g} years (report.min_effect)."
    )


def best_rows(a: Analysis) -> Table:
    """The paired test of the runner-up against the best cell (test MAE, runner-up − best)."""
    b = a.best
    t = b["test"]
    conf = conf_label(a.confidence)
    head = ["best", "runner-up", "seeds paired", "runner-up − best (years)", f"{conf} CI", "p"]
    head += ["p (Holm)", "significant", f"detectable at {100 * a.power:.0f} % power (years)"]
    head += [f"seeds to detect {a.min_effect:g} y"]
    row = [b["best"]["cell"], b["runner_up"]["cell"], str(t["n_pairs"]), _num(t["diff"])]
    row += [f"{_num(t['lo'])} to {_num(t['hi'])}", _p(t["p"]), _p(t.get("p_holm", math.nan))]
    row += ["yes" if t.get("significant") else "no", _num(t.get("mde", math.nan))]
    row += [_seeds(t.get("seeds_needed", math.nan))]
    return head, [row]


def _seeds(x: float) -> str:
    if not isinstance(x, float | int) or math.isnan(x):
        return "–"
    return f"{x:.0f}" if math.isfinite(x) else "too many"


def simple_rows(a: Analysis) -> Table:
    head = [
        "factor",
        "comparison (b − a)",
        "at",
        "pairs",
        "mean difference",
        f"{conf_label(a.confidence)} CI",
    ]
    rows = [
        [
            r.factor,
            f"{r.level_b} − {r.level_a}",
            r.at,
            str(r.n_pairs),
            _num(r.diff),
            f"{_num(r.lo)} to {_num(r.hi)}",
        ]
        for r in a.simple_effects.itertuples()
    ]
    return head, rows


def md_table(table: Table) -> str:
    head, rows = table
    esc = [[c.replace("|", "\\|") for c in r] for r in [head, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def html_table(table: Table) -> str:
    head, rows = table
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------ figures


def _factors(a: Analysis) -> list[str]:
    """Categorical factors with two or more completed levels, usual ones first."""
    done = a.complete
    have = [f for f in a.design.factors if done[f].astype(str).nunique() >= 2]
    return sorted(have, key=lambda f: PREFERRED.index(f) if f in PREFERRED else len(PREFERRED))


def _levels(a: Analysis, f: str) -> list[str]:
    present = set(a.complete[f].astype(str))
    return [str(v) for v in a.design.levels[f] if str(v) in present]


def _mean_ci(values: pd.Series, conf: float) -> tuple[float, float]:
    m, lo, _hi, _n = t_interval(values, conf)
    return m, (m - lo) if math.isfinite(lo) else 0.0


def heatmap(a: Analysis) -> Figure | None:
    fs = _factors(a)
    if len(fs) < 2:
        return None
    rows_f, cols_f = fs[0], fs[1]
    facet_f = fs[2] if len(fs) > 2 else None
    facets = _levels(a, facet_f) if facet_f else [None]
    done = a.complete.assign(**{f: a.complete[f].astype(str) for f in fs})
    r_lv, c_lv = _levels(a, rows_f), _levels(a, cols_f)
    if len(r_lv) < 2 or len(c_lv) < 2:  # levels not among the planned ones: nothing to map
        return None
    means = []
    for fv in facets:
        sub = done if fv is None else done[done[facet_f] == fv]
        grid = (
            sub.groupby([rows_f, cols_f])["mae"].mean().unstack().reindex(index=r_lv, columns=c_lv)
        )
        means.append(grid)
    vals = np.concatenate([g.to_numpy(dtype=float).ravel() for g in means])
    if not np.isfinite(vals).any():
        return None
    vmin, vmax = np.nanmin(vals), np.nanmax(vals)
    fig = Figure(figsize=(min(4.2 * len(facets), 13), 3.4 + 0.25 * len(r_lv)), layout="constrained")
    axes = fig.subplots(1, len(facets), squeeze=False)[0]
    im = None
    for ax, fv, grid in zip(axes, facets, means, strict=True):
        arr = grid.to_numpy(dtype=float)
        im = ax.imshow(arr, cmap="viridis_r", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(c_lv)), c_lv, rotation=30, ha="right")
        ax.set_yticks(range(len(r_lv)), r_lv)
        ax.set_xlabel(a.design.label(cols_f))
        ax.set_ylabel(a.design.label(rows_f))
        if fv is not None:
            ax.set_title(f"{a.design.label(facet_f)} = {fv}", fontsize=10)
        mid = (vmin + vmax) / 2
        for i in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                text = "n/a" if not np.isfinite(arr[i, j]) else f"{arr[i, j]:.2f}"
                color = "white" if np.isfinite(arr[i, j]) and arr[i, j] > mid else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=9, color=color)
    if im is not None:
        fig.colorbar(im, ax=list(axes), label="mean test MAE (years)", shrink=0.9)
    fig.suptitle("Mean test MAE per cell (lower is better)", fontsize=11)
    return fig


def interaction_plot(a: Analysis) -> Figure | None:
    fs = _factors(a)
    if not fs:
        return None
    x_f = fs[0]
    line_f = fs[1] if len(fs) > 1 else None
    facet_f = fs[2] if len(fs) > 2 else None
    facets = _levels(a, facet_f) if facet_f else [None]
    done = a.complete.assign(**{f: a.complete[f].astype(str) for f in fs})
    x_lv = _levels(a, x_f)
    lines = _levels(a, line_f) if line_f else [None]
    fig = Figure(figsize=(min(4.2 * len(facets), 13), 3.6), layout="constrained")
    axes = fig.subplots(1, len(facets), squeeze=False, sharey=True)[0]
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    for ax, fv in zip(axes, facets, strict=True):
        sub = done if fv is None else done[done[facet_f] == fv]
        for k, lv in enumerate(lines):
            part = sub if lv is None else sub[sub[line_f] == lv]
            stats_ = [_mean_ci(part.loc[part[x_f] == x, "mae"], a.confidence) for x in x_lv]
            m = [s[0] for s in stats_]
            e = [s[1] for s in stats_]
            offset = (k - (len(lines) - 1) / 2) * 0.06
            ax.errorbar(
                np.arange(len(x_lv)) + offset,
                m,
                yerr=e,
                marker="o",
                capsize=4,
                color=palette[k % len(palette)],
                label=None if lv is None else f"{a.design.label(line_f)} = {lv}",
            )
        ax.set_xticks(range(len(x_lv)), x_lv)
        ax.set_xlabel(a.design.label(x_f))
        if fv is not None:
            ax.set_title(f"{a.design.label(facet_f)} = {fv}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test MAE, mean ± {conf_label(a.confidence)} CI")
    if line_f:
        axes[-1].legend(fontsize=8)
    fig.suptitle("Interaction plot: parallel lines mean no interaction", fontsize=11)
    return fig


def forest_plot(a: Analysis) -> Figure | None:
    comp = a.comparisons[a.comparisons["n_pairs"] >= 2]
    if comp.empty:
        return None
    fig = Figure(figsize=(7.5, 1.2 + 0.45 * len(comp)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(comp))[::-1]
    for yi, r in zip(y, comp.itertuples(), strict=True):
        color = "#d62728" if r.significant else "#555555"
        lo = r.lo if math.isfinite(r.lo) else r.diff
        hi = r.hi if math.isfinite(r.hi) else r.diff
        ax.plot([lo, hi], [yi, yi], color=color, lw=2)
        ax.plot([r.diff], [yi], "o", color=color)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [f"{r.factor}: {r.level_b} − {r.level_a}" for r in comp.itertuples()])
    ax.set_xlabel(
        f"paired difference in test MAE (years), unadjusted {conf_label(a.confidence)} CI"
    )
    ax.set_title("Paired comparisons (red: significant after Holm)", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    return fig


def coverage_plot(a: Analysis) -> Figure | None:
    done = a.complete
    ok = done[np.isfinite(done["coverage_at_mae"].astype(float))]
    if ok.empty:
        return None
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    verdict_colors = {"normal": COLORS["normal"], "laplace": COLORS["laplace"]}
    for v, part in ok.groupby(ok["verdict"].replace("", "n/a")):
        ax.scatter(
            part["mae"],
            part["coverage_at_mae"],
            s=28,
            alpha=0.8,
            color=verdict_colors.get(v, "#7f7f7f"),
            label=f"verdict: {v}",
        )
    ax.axhline(
        NORMAL_CS_AT_MAE,
        color=COLORS["normal"],
        ls="--",
        label=f"normal prediction {NORMAL_CS_AT_MAE:.3f}",
    )
    ax.axhline(
        LAPLACE_CS_AT_MAE,
        color=COLORS["laplace"],
        ls=":",
        label=f"Laplace prediction {LAPLACE_CS_AT_MAE:.3f}",
    )
    cov = a.coverage
    if math.isfinite(cov.get("lo", math.nan)):
        ax.axhspan(
            cov["lo"],
            cov["hi"],
            color="#999999",
            alpha=0.2,
            label=f"observed mean, {conf_label(a.confidence)} CI",
        )
    ax.set_xlabel("test MAE (years)")
    ax.set_ylabel("share of test errors within the MAE")
    ax.set_title("Coverage at the MAE: observed vs normal and Laplace theory", fontsize=11)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def coverage_beta_plot(a: Analysis) -> Figure | None:
    """Observed coverage at the MAE against each run's fitted shape β (with its interval),
    the theoretical curve and the normal and Laplace points: by
    :func:`agelab.plots.coverage_vs_beta_figure`. None for runs logged before β existed."""
    done = a.complete
    beta = done["shape_beta"].astype(float).to_numpy()
    cov = done["coverage_at_mae"].astype(float).to_numpy()
    ok = done[np.isfinite(beta) & np.isfinite(cov)]
    if ok.empty:
        return None
    return coverage_vs_beta_figure(
        ok["shape_beta"].astype(float).to_numpy(),
        ok["shape_beta_low"].astype(float).to_numpy(),
        ok["shape_beta_high"].astype(float).to_numpy(),
        ok["coverage_at_mae"].astype(float).to_numpy(),
        labels=ok["verdict"].fillna("").replace("", "n/a").astype(str).tolist(),
    )


def importance_plot(a: Analysis) -> Figure | None:
    if not a.importances:
        return None
    items = sorted(a.importances.items(), key=lambda kv: kv[1])
    fig = Figure(figsize=(6, 1 + 0.4 * len(items)), layout="constrained")
    ax = fig.add_subplot()
    ax.barh([a.design.label(k) for k, _ in items], [v for _, v in items], color="#1f77b4")
    ax.set_xlabel("fANOVA importance for test MAE")
    ax.set_title("Parameter importances (random search)", fontsize=11)
    return fig


def cs_plot(curves: dict[str, pd.DataFrame]) -> Figure | None:
    if not curves:
        return None
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    colors = {"best": "#1f77b4", "worst": "#d62728"}
    for which, c in curves.items():
        col = colors.get(which, "#333333")
        label = f"{which}: {c.attrs.get('cell', '')} ({c.attrs.get('n', '?')} runs)"
        ax.plot(c["k"], c["observed"], color=col, lw=2, label=label + " observed")
        ax.plot(c["k"], c["normal"], color=col, ls="--", lw=1, label=f"{which}: normal from MAE")
        ax.plot(c["k"], c["laplace"], color=col, ls=":", lw=1, label=f"{which}: Laplace from MAE")
    ax.set_xlabel("k (years)")
    ax.set_ylabel("CS(k): share within k years")
    ax.set_ylim(0, 1.01)
    ax.set_title("Cumulative score of the best and worst cells", fontsize=11)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


FIGURES: list[tuple[str, str, Callable[..., Figure | None]]] = [
    ("heatmap", "Mean test MAE per cell", heatmap),
    ("interaction", "Interaction plot", interaction_plot),
    ("comparisons", "Paired comparisons", forest_plot),
    ("coverage", "Coverage at the MAE vs theory", coverage_plot),
    (
        "coverage_beta",
        "Coverage at the MAE against the fitted residual shape β",
        coverage_beta_plot,
    ),
    ("importances", "Parameter importances", importance_plot),
]


# ------------------------------------------------------------------------------ writing


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1180px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f3f5f8}tr:nth-child(even) td{background:#fafafa}
.verdict li{margin:.35em 0}.meta{color:#555;font-size:.9em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em}.note{color:#666;font-size:.9em}
"""


def how_to_read(a: Analysis) -> list[str]:
    """The caveats, in the report itself (some depend on the study: what a replicate varied,
    the Holm family's size, the power level)."""
    family = f"{a.family_size} tests" if a.family_size else "the tests"
    return [
        "Test MAE is the mean absolute error on the held-out test split (years); cells are "
        "chosen by the calib split only, so the test numbers are not optimistically selected.",
        "Intervals are two-sided t-intervals over replicates (seeds), not adjusted for multiple "
        "comparisons; a cell with one replicate has none. Significance is decided by the "
        "Holm-adjusted p-values only.",
        replicate_note(a),
        "Paired comparisons match runs that share the seed and every other choice, so "
        "run-to-run noise common to a pair cancels. Pairs pooled across the other factors are "
        "treated as independent, which assumes no seed × choice interaction (as the ANOVA's "
        "seed block does).",
        f"Every p-value the report may call significant (ANOVA effects, paired comparisons and "
        f"the best cell against its runner-up; here {family}) is Holm-adjusted as one family: "
        "the chance of any false 'significant' in this report is at most alpha.",
        "The best cell is the one with the lowest mean calib MAE (the objective). The runner-up "
        "is called not distinguishable only when the paired test of the two cells' test MAE "
        "(same seeds) is not significant in that family; overlapping intervals decide nothing.",
        f"'No detectable difference' is not 'no difference': for each undecided paired test the "
        f"report states the smallest difference its pairs could detect with "
        f"{100 * a.power:.0f} % power (two-sided, from the observed spread of the paired "
        f"differences, at level {power_level(a)}, which guarantees a Holm rejection whatever "
        f"the other tests say) and about how many seeds would detect {a.min_effect:g} years "
        "(report.min_effect).",
        "η² is the share of the total variance in test MAE explained by a term (type-II sums of "
        "squares).",
        "Coverage at the MAE: if residuals are normal, 57.5 % of errors fall within the MAE; if "
        "Laplace, 63.2 %. A generalised normal with shape β (2 normal, 1 Laplace, lower is "
        "heavier-tailed) predicts the share for every shape in between and beyond; the per-run "
        "label comes from β's interval, a skewness test and a tail check (see "
        "docs/diagnostics.md).",
        "The conformal interval (prediction ± half-width) is calibrated on held-out faces: at "
        "least 90 % of new faces fall inside it on average when they are exchangeable with the "
        "calibration faces (same population, no selection on those faces).",
    ]


def write(
    a: Analysis,
    folder: Path,
    *,
    meta: dict[str, Any],
    figures: bool = True,
    cs_curves: dict[str, pd.DataFrame] | None = None,
) -> tuple[Path, Path]:
    """Write report.md, report.html, figures/*.png and runs.csv into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    fig_dir = folder / "figures"
    figs = _write_figures(a, fig_dir, cs_curves) if figures else []
    fresh = {path.name for _name, _title, path in figs}
    for old in fig_dir.glob("*.png"):  # never leave a previous report's figures behind
        if old.name not in fresh:
            old.unlink()
    from agelab.csvsafe import safe_frame  # run names and params are user text

    table = safe_frame(a.runs.drop(columns=[c for c in ("start_time",) if c in a.runs]))
    _replace(folder / "runs.csv", lambda tmp: table.to_csv(tmp, index=False, encoding="utf-8"))
    date = time.strftime("%Y-%m-%d %H:%M")
    meta_line = " · ".join(
        f"{k}: {v}"
        for k, v in [("generated", date), *meta.items()]
        if v and k != "study" and k != "description"
    )
    page = _Page(
        title=f"Ablation report: {meta.get('study', '')}",
        meta_line=meta_line,
        description=str(meta.get("description") or "").strip(),
        sections=_sections(a),
        figs=figs,
    )
    md_path, html_path = folder / "report.md", folder / "report.html"
    markdown, page_html = _markdown(a, page), _html(a, page)
    _replace(md_path, lambda tmp: tmp.write_text(markdown, encoding="utf-8"))
    _replace(html_path, lambda tmp: tmp.write_text(page_html, encoding="utf-8"))
    return md_path, html_path


def _replace(path: Path, write: Callable[[Path], object]) -> Path:
    """``write`` a temp file beside ``path``, then rename it over ``path``: a report stopped
    midway (Ctrl-C) leaves each file whole, the previous version or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


Section = tuple[str, list[tuple[str, Any]]]  # heading, [("table", Table) | ("text", str)]


@dataclass
class _Page:
    title: str
    meta_line: str
    description: str
    sections: list[Section]
    figs: list[tuple[str, str, Path]]  # name, title, PNG file


def _write_figures(
    a: Analysis,
    fig_dir: Path,
    cs_curves: dict[str, pd.DataFrame] | None,
) -> list[tuple[str, str, Path]]:
    """The report's figures as PNG files: (name, title, file) of those that apply."""
    builders = [
        *FIGURES,
        ("cs_curves", "CS curves of the best and worst cells", lambda _a: cs_plot(cs_curves or {})),
    ]
    figs = []
    for name, title, make in builders:
        fig = make(a)
        if fig is not None:
            path = _replace(fig_dir / f"{name}.png", lambda tmp, fig=fig: save_png(fig, tmp))
            figs.append((name, title, path))
    return figs


def _markdown(a: Analysis, page: _Page) -> str:
    md = [f"# {page.title}", "", f"_{page.meta_line}_", ""]
    if page.description:
        md += [page.description, ""]
    md += ["## Verdict", "", *[f"- {s}" for s in a.verdict], ""]
    for head, body in page.sections:
        md += [f"## {head}", ""]
        for kind, item in body:
            md += [md_table(item) if kind == "table" else item, ""]
    if page.figs:
        md += ["## Figures", ""]
        md += [f"![{t}](figures/{p.name})" for _n, t, p in page.figs]
        md.append("")
    md += ["## How to read this", "", *[f"- {s}" for s in how_to_read(a)], ""]
    return "\n".join(md)


def _html(a: Analysis, page: _Page) -> str:
    """One self-contained page: figures embedded as data URIs."""
    title = html.escape(page.title)
    h = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{title}</title><style>{CSS}</style></head><body>",
        f"<h1>{title}</h1><p class='meta'>{html.escape(page.meta_line)}</p>",
    ]
    if page.description:
        h.append(f"<p>{html.escape(page.description)}</p>")
    h.append("<h2 id='verdict'>Verdict</h2><ul class='verdict'>")
    h += [f"<li>{html.escape(s)}</li>" for s in a.verdict]
    h.append("</ul>")
    for head, body in page.sections:
        h.append(f"<h2>{html.escape(head)}</h2>")
        for kind, item in body:
            h.append(html_table(item) if kind == "table" else f"<p>{html.escape(item)}</p>")
    if page.figs:
        h.append("<h2 id='figures'>Figures</h2>")
        for name, t, p in page.figs:
            data = base64.b64encode(p.read_bytes()).decode()
            h.append(
                f"<figure id='fig-{name}'><img alt='{html.escape(t)}' "
                f"src='data:image/png;base64,{data}'><figcaption>{html.escape(t)}"
                "</figcaption></figure>"
            )
    h.append("<h2>How to read this</h2><ul>")
    h += [f"<li>{html.escape(s)}</li>" for s in how_to_read(a)]
    h.append("</ul></body></html>")
    return "\n".join(h)


def _sections(a: Analysis) -> list[tuple[str, list[tuple[str, Any]]]]:
    out: list[tuple[str, list[tuple[str, Any]]]] = []
    if a.missing:
        out.append(("What is missing", [("text", "; ".join(a.missing))]))
    out.append(("Cells", [("table", cells_table(a)), ("text", cells_note(a))]))
    if a.anova is not None:
        body: list[tuple[str, Any]] = [("table", anova_rows(a))]
        if a.anova_note:
            body.append(("text", a.anova_note))
        out.append(("Effects on test MAE (type-II ANOVA)", body))
    elif a.anova_note:
        out.append(("Effects on test MAE (type-II ANOVA)", [("text", a.anova_note)]))
    if a.regression is not None:
        out.append(
            ("Regression of test MAE on the searched parameters", [("table", regression_rows(a))])
        )
    if len(a.comparisons):
        out.append(("Paired comparisons", [("table", comparison_rows(a)), ("text", power_note(a))]))
    if (a.best or {}).get("test"):
        out.append(("Best cell against the runner-up", [("table", best_rows(a))]))
    if len(a.simple_effects):
        out.append(
            (
                "Paired comparisons at each level of the other factors",
                [
                    (
                        "text",
                        "Descriptive (not tested): where an interaction is significant, "
                        "these say where the effect lives.",
                    ),
                    ("table", simple_rows(a)),
                ],
            )
        )
    if a.importances:
        out.append(
            (
                "Parameter importances (fANOVA)",
                [
                    (
                        "table",
                        (
                            ["parameter", "importance"],
                            [
                                [a.design.label(k), _num(v, 3)]
                                for k, v in sorted(a.importances.items(), key=lambda kv: -kv[1])
                            ],
                        ),
                    )
                ],
            )
        )
    return out

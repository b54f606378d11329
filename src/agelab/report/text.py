"""How numbers are written in the report's sentences and tables (one spelling everywhere)."""

from __future__ import annotations

import math


def format_p(p: float, *, relation: bool = True) -> str:
    """A p-value: ``p = 0.012`` / ``p < 0.001`` / ``p n/a`` in sentences (``relation``),
    ``0.012`` / ``< 0.001`` / ``–`` in table cells."""
    if not isinstance(p, float | int) or not math.isfinite(p):
        return "p n/a" if relation else "–"
    if p < 0.001:
        return "p < 0.001" if relation else "< 0.001"
    return f"p = {p:.3f}" if relation else f"{p:.3f}"


def years(x: float) -> str:
    return f"{x:.2f}"


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def conf_label(confidence: float) -> str:
    """``95 %``, ``97.5 %``: one spelling for every interval level in the report."""
    return f"{100 * confidence:.4g} %"

"""What every metric shares: the ``MetricSet`` result type, input validation, and running
numerical code quietly (an undefined statistic is NaN with the reason in ``notes``; numpy,
scipy and statsmodels warnings are suppressed)."""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np

#: Values further than this from 0 are rejected: ages are in years, so such values are a unit
#: or overflow bug, and they would overflow the sums of squares.
MAX_ABS_VALUE = 1e9
#: Resolution in years: spreads below this count as constant, and |e| <= k is tested with
#: this slack so that e.g. 31.1 - 30.1 = 1.0000000000000036 counts as "within 1 year".
TOL = 1e-9


class MetricSet(dict[str, float]):
    """A ``{name: float}`` dict plus ``notes``: ``{name: why it is NaN / caveat}``."""

    def __init__(self, values: dict[str, float] | None = None, notes: dict[str, str] | None = None):
        super().__init__(values or {})
        self.notes: dict[str, str] = dict(notes or {})

    def put(self, name: str, value: float, note: str | None = None) -> None:
        self[name] = float(value)
        if note:
            self.notes[name] = note

    def nan(self, names: str | Sequence[str], note: str) -> None:
        for name in [names] if isinstance(names, str) else names:
            self.put(name, math.nan, note)

    def merge(self, other: MetricSet) -> None:
        self.update(other)
        self.notes.update(other.notes)


def pct(level: float) -> str:
    """0.9 -> '90', 0.975 -> '97.5' (for metric names)."""
    return f"{level * 100:.10g}"


@contextlib.contextmanager
def quiet_ctx() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            yield


def quiet(fn: Callable) -> Callable:
    """Run ``fn`` with numpy/scipy/statsmodels warnings suppressed (NaN + note instead)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with quiet_ctx():
            return fn(*args, **kwargs)

    return wrapper


def as_1d(x: object, name: str, limit: float = MAX_ABS_VALUE) -> np.ndarray:
    """Validate one input array: numeric, 1-D (or a column), non-empty, finite, sane scale."""
    if x is None:
        raise ValueError(f"{name} is None")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. complex -> float discarding imaginary parts
            a = np.asarray(x, dtype=float)
    except (TypeError, ValueError, Warning) as exc:
        raise ValueError(f"{name} must be numeric ages in years ({exc})") from None
    if a.ndim == 2 and 1 in a.shape:  # model outputs often come as an [n, 1] column
        a = a.reshape(-1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    bad = ~np.isfinite(a)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf); "
            f"first at index {first}"
        )
    big = np.abs(a) > limit
    if big.any():
        first = int(np.flatnonzero(big)[0])
        raise ValueError(
            f"{name} contains {int(big.sum())} value(s) beyond +-{limit:g} years "
            f"(first at index {first}: {a[first]:g}); check units / overflow"
        )
    return a


def check_pair(
    y_true: object, y_pred: object, true_name: str, pred_name: str, min_n: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    t = as_1d(y_true, true_name)
    p = as_1d(y_pred, pred_name)
    if t.size != p.size:
        raise ValueError(
            f"length mismatch: {true_name} has {t.size} values but {pred_name} has {p.size}"
        )
    if t.size < min_n:
        raise ValueError(
            f"too few points: {true_name}/{pred_name} have {t.size}, need at least {min_n}"
        )
    return t, p


def check_residuals(residuals: object, name: str = "residuals") -> np.ndarray:
    e = as_1d(residuals, name, limit=2 * MAX_ABS_VALUE)  # a difference of two ages
    if e.size < 3:
        raise ValueError(f"too few points: {name} has {e.size}, need at least 3")
    return e


def is_constant(x: np.ndarray) -> bool:
    """True if the spread of ``x`` is below the resolution TOL (relative for large values)."""
    return float(np.ptp(x)) <= TOL * max(1.0, float(np.max(np.abs(x))))


def check_k_max(k_max: object) -> int:
    if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)) or k_max < 1:
        raise ValueError(f"k_max must be a positive integer, got {k_max!r}")
    return int(k_max)


def check_levels(levels: object) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in levels)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(
            f"conformal_levels must be a sequence of numbers, got {levels!r}"
        ) from None
    if not out or any(not (0.0 < v < 1.0) for v in out):
        raise ValueError(f"conformal_levels must be non-empty and in (0, 1), got {levels!r}")
    return out


def check_edges(edges: object, name: str = "age_bands") -> np.ndarray:
    try:
        e = np.asarray(edges, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of band edges, got {edges!r}") from None
    if e.size < 2 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ValueError(
            f"{name} must hold at least 2 finite, strictly increasing edges, got {edges!r}"
        )
    return e

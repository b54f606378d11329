"""fANOVA importances of the searched parameters, computed by Optuna for any response."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import optuna

from agelab.config import Range
from agelab.study.plan import space_distributions


def param_importances(
    space: dict[str, Any], params: list[dict[str, Any]], values: list[float], seed: int = 0
) -> dict[str, float] | None:
    """fANOVA importances of the searched parameters for ``values`` (e.g. test MAE).

    Built on an in-memory Optuna study of the completed trials, so any response (not only
    the objective the study optimised) can be explained. None when there are too few trials
    or nothing varies.
    """
    dists = space_distributions(
        {k: Range.model_validate(v) if isinstance(v, dict) else v for k, v in space.items()}
    )
    study = optuna.create_study()
    for p, v in zip(params, values, strict=True):
        if not math.isfinite(v):
            continue
        with contextlib.suppress(ValueError):  # a value outside the space: skip the row
            study.add_trial(
                optuna.trial.create_trial(
                    params={k: _coerce(d, p[k]) for k, d in dists.items()},
                    distributions=dists,
                    value=v,
                )
            )
    if len(study.trials) < 3:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed)
            )
    except (RuntimeError, ValueError):
        return None
    return {k: float(v) for k, v in result.items()}


def _coerce(dist: optuna.distributions.BaseDistribution, value: Any) -> Any:
    if isinstance(dist, optuna.distributions.IntDistribution):
        return round(float(value))
    if isinstance(dist, optuna.distributions.FloatDistribution):
        return float(value)
    return value

"""Point metrics: MAE, RMSE, median absolute error, bias, residual sd, max error, R^2,
Pearson r."""

from __future__ import annotations

import math

import numpy as np

from agelab.metrics.checks import MetricSet, check_pair, is_constant, quiet

POINT_DOCS: dict[str, str] = {
    "n": "number of test cases",
    "mae": "mean absolute error, mean |pred - true| (years)",
    "rmse": "root mean squared error (years)",
    "medae": "median absolute error (years)",
    "bias": "mean residual, mean(pred - true) (years); > 0 means over-estimated ages",
    "resid_sd": "sample standard deviation of the residuals (ddof=1, years)",
    "max_abs_error": "largest absolute error (years)",
    "r2": "coefficient of determination 1 - SS_res/SS_tot",
    "pearson_r": "Pearson correlation between true and predicted age",
}


@quiet
def point_metrics(y_true: object, y_pred: object) -> MetricSet:
    """MAE, RMSE, median absolute error, bias, residual sd, max error, R^2, Pearson r."""
    t, p = check_pair(y_true, y_pred, "y_true", "y_pred")
    e = p - t
    a = np.abs(e)
    out = MetricSet()
    out.put("n", t.size)
    out.put("mae", a.mean())
    out.put("rmse", math.sqrt(float(np.mean(e * e))))
    out.put("medae", np.median(a))
    out.put("bias", e.mean())
    out.put("resid_sd", e.std(ddof=1))
    out.put("max_abs_error", a.max())
    tc = t - t.mean()
    pc = p - p.mean()
    if is_constant(t):
        out.nan("r2", "y_true is constant: R^2 undefined (zero variance of the truth)")
    else:
        out.put("r2", 1.0 - float(np.sum(e * e)) / float(np.sum(tc * tc)))
    if is_constant(t) or is_constant(p):
        which = "y_true" if is_constant(t) else "y_pred"
        out.nan("pearson_r", f"{which} is constant: correlation undefined")
    else:
        r = float(np.sum(tc * pc)) / math.sqrt(float(np.sum(tc * tc)) * float(np.sum(pc * pc)))
        out.put("pearson_r", min(1.0, max(-1.0, r)))
    return out

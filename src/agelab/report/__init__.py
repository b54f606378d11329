"""The ablation report: what a study's runs say about norm, act and backbone, in numbers
and words.

A pure function of a runs table — this package imports neither optuna nor mlflow:

* :mod:`.design` — what the study searched (:class:`Design`) and its runs as one table;
* :mod:`.stats` — t-intervals, Holm, type-II ANOVA with a seed block, paired comparisons,
  the best cell against its runner-up, paired t-test power, the coverage rule of thumb and
  the residual shape β;
* :mod:`.analysis` — :func:`analyse`: cells, tests in one Holm family (the best cell's test
  included), power of the undecided ones, best cell, gaps;
* :mod:`.verdict` — the sentences, each backed by a number in the tables;
* :mod:`.render` — ``report.md``, a self-contained ``report.html``, figures, ``runs.csv``.

Reading a study's runs from the store and writing the report beside it is
:mod:`agelab.reporting`.
"""

from agelab.errors import ReportError
from agelab.report.analysis import Analysis, analyse
from agelab.report.design import Design, design_from_parent, runs_table
from agelab.report.stats import holm, paired_test, t_interval
from agelab.report.text import conf_label

__all__ = [
    "Analysis",
    "Design",
    "ReportError",
    "analyse",
    "conf_label",
    "design_from_parent",
    "holm",
    "paired_test",
    "runs_table",
    "t_interval",
]

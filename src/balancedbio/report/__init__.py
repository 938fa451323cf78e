"""The run's report: the paper's tables and figures from this run's results (Table 1-3, Figures
2-4, eq. 2), as CSV, Markdown and one self-contained HTML page (Jinja2 templates in
``balancedbio/templates``).

Modules: ``load`` (the declared files into ``RunData`` and tidy DataFrames; the compared
capabilities), ``stats`` (the project's one home for Wilson intervals, the paired bootstrap and
minimum detectable effects), ``tables`` (rows and display tables), ``findings`` (the verdict and
the sentences), ``figures`` (matplotlib) and ``render`` (``build_report``: CSV, Markdown, HTML).

It reads only the files it is given (the report rule passes its declared inputs), never a
folder. Every number comes from a result file; intervals are 95%: Wilson intervals for single
accuracies (from the evaluation files) and paired percentile-bootstrap intervals
(``scipy.stats.bootstrap`` over the paired differences) over the shared items for differences between two
models, so the wording says "not significant" whenever an interval contains 0. Each difference
carries its minimum detectable effect: the smallest true paired difference that a two-sided
test at the same level detects with 80% power, given the observed spread of the paired
differences.
"""


from balancedbio.report.findings import conclusions, steering_findings, verdict
from balancedbio.report.load import (COMPARED_CAPABILITIES, ComparedCapability, RunData, load_dynamics, load_heldout,
                                     load_results, results_frame, subjects_frame)
from balancedbio.report.render import build_report
from balancedbio.report.stats import (detection_factor, minimum_detectable_effect, paired_difference,
                                      wilson_interval)
from balancedbio.report.tables import (_mde_cell, alignment_tax, aoc_rows, comparison_rows, significance_class,
                                       steering_rows)

__all__ = ["COMPARED_CAPABILITIES", "ComparedCapability", "RunData", "_mde_cell", "alignment_tax", "aoc_rows",
           "build_report", "comparison_rows", "conclusions", "detection_factor", "load_dynamics", "load_heldout",
           "load_results", "minimum_detectable_effect", "paired_difference", "results_frame", "significance_class",
           "steering_findings", "steering_rows", "subjects_frame", "verdict", "wilson_interval"]

"""The run's report: the paper's tables and figures from this run's results (Table 1-3, Figures
2-4, eq. 2), as CSV, Markdown and one self-contained HTML page (Jinja2 templates in
``balancedbio/templates``).

It reads only the files it is given (the report rule passes its declared inputs), never a
folder. Every number comes from a result file; intervals are 95%: Wilson intervals for single
accuracies (from the evaluation files) and paired percentile-bootstrap intervals
(``scipy.stats.bootstrap`` over the paired differences) over the shared items for differences between two
models, so the wording says "not significant" whenever an interval contains 0. Each difference
carries its minimum detectable effect: the smallest true paired difference that a two-sided
test at the same level detects with 80% power, given the observed spread of the paired
differences.
"""


from balancedbio.report.load import RunData, load_dynamics, load_heldout, load_results
from balancedbio.report.render import build_report
from balancedbio.report.stats import minimum_detectable_effect, paired_difference
from balancedbio.report.tables import (_mde_cell, alignment_tax, aoc_rows, comparison_rows, steering_findings,
                                       steering_rows)

__all__ = ["RunData", "_mde_cell", "alignment_tax", "aoc_rows", "build_report", "comparison_rows", "load_dynamics",
           "load_heldout", "load_results", "minimum_detectable_effect", "paired_difference", "steering_findings",
           "steering_rows"]

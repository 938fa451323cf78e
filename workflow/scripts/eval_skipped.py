"""Rule eval_skipped: the list of (model, benchmark) pairs that could not be evaluated, and why."""

from balancedbio.evaluation import collect_skipped
from balancedbio.logs import setup_rule_logging

snakemake = globals()["snakemake"]
log = setup_rule_logging(snakemake.log[0])
skipped = collect_skipped(list(snakemake.input), snakemake.output[0])
log.info("%d of %d evaluations skipped", len(skipped), len(snakemake.input))

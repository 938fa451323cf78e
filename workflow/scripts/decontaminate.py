"""Rule decontaminate: drop training rows that overlap the evaluation benchmarks."""

from balancedbio.data.pipeline import decontaminate
from balancedbio.logs import setup_rule_logging

snakemake = globals()["snakemake"]
setup_rule_logging(snakemake.log[0])
names = ("mcq_train", "mcq_val", "steps", "sft", "prompts")
external = [(name, schema, rows, status) for (name, schema), rows, status
            in zip(snakemake.params.external, snakemake.input.external, snakemake.input.external_status)]
decontaminate(
    sources={name: snakemake.input[name] for name in names},
    external=external,
    kg_test_path=snakemake.input.kg_test,
    benchmarks_dir=snakemake.params.benchmarks_dir,
    benchmarks=list(snakemake.params.benchmarks),
    ngram=snakemake.params.ngram,
    threshold=snakemake.params.threshold,
    outputs={name: snakemake.output[name] for name in names},
    report_path=snakemake.output.report,
)

"""Rule ingest: one external dataset mapped into the project's schema (skipped if unreachable)."""

from balancedbio.data.pipeline import ingest_dataset
from balancedbio.logs import setup_rule_logging

snakemake = globals()["snakemake"]
setup_rule_logging(snakemake.log[0])
ingest_dataset(dict(snakemake.params.spec), snakemake.output.rows, snakemake.output.status)

"""Snakemake script for rule prepare_model: thin wrapper around balancedbio.models."""

from balancedbio.logs import setup_rule_logging
from balancedbio.models import prepare_base_model

snakemake = globals()["snakemake"]  # injected by Snakemake's script directive

setup_rule_logging(snakemake.log[0])
prepare_base_model(
    snakemake.params.source,
    snakemake.output[0],
    dtype=snakemake.params.dtype,
    revision=snakemake.params.revision,
    trust_remote_code=snakemake.params.trust_remote_code,
    chat_template=snakemake.params.chat_template,
)

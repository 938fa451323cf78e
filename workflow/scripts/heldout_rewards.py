"""Rule heldout_rewards: one model's mean R_acc / R_reas / R_inst on held-out kg questions and instruction prompts."""

from balancedbio.devices import enter_job
from balancedbio.heldout import heldout_rewards
from balancedbio.logs import setup_logging

snakemake = globals()["snakemake"]
setup_logging(snakemake.log[0])
# The rule holds evaluate's GPU slot: generate on that device (gpu: 0 stays on the CPU).
device, gpu_locks = enter_job(int(snakemake.resources.get("gpu", 0)))
heldout_rewards(model_dir=snakemake.input.model, model_name=snakemake.wildcards.model,
                mcq_test=snakemake.input.kg_test, graph=snakemake.input.graph,
                train_prompts=snakemake.input.train_prompts, settings=snakemake.params.settings,
                instruct_config=snakemake.params.instruct, rewards_config=snakemake.params.rewards,
                seed=snakemake.params.seed, benchmarks_dir=snakemake.params.benchmarks_dir,
                out_json=snakemake.output.result, out_items=snakemake.output.item_rewards, prm_dir=snakemake.input.prm,
                trust_remote_code=snakemake.params.trust_remote_code, device=device)

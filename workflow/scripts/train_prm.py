"""Rule train_prm: fine-tune the step classifier, write held-out metrics and a confusion plot."""

from balancedbio.devices import enter_job
from balancedbio.logs import setup_rule_logging
from balancedbio.prm import plot_confusion, train_prm

snakemake = globals()["snakemake"]
setup_rule_logging(snakemake.log[0])
# Claim the rule's GPU slot before torch starts CUDA (gpu: 0 stays on the CPU, also on a GPU box).
device, gpu_locks = enter_job(int(snakemake.resources.get("gpu", 0)))
params = snakemake.params.prm
metrics = train_prm(steps_path=snakemake.input.steps,
                    encoder=params["encoder"], out_dir=snakemake.output.model,
                    metrics_path=snakemake.output.metrics, checkpoint_dir=snakemake.params.checkpoints,
                    prm_config=params, seed=snakemake.params.seed, trust_remote_code=params["trust_remote_code"],
                    report_to=snakemake.params.logging["report_to"])
plot_confusion(metrics, snakemake.output.confusion)

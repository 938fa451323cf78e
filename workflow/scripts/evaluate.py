"""Rule evaluate: one model on one benchmark through lm-eval (or a 'skipped' record with the reason)."""

from balancedbio.devices import enter_job
from balancedbio.evaluation import evaluate_benchmark
from balancedbio.logs import setup_rule_logging

snakemake = globals()["snakemake"]
setup_rule_logging(snakemake.log[0])
# Concurrent GPU evaluations each get their own device (no-op on CPU and under SLURM); gpu: 0 stays on the CPU.
device, gpu_locks = enter_job(int(snakemake.resources.get("gpu", 0)))
evaluate_benchmark(model_dir=snakemake.input.model, model_name=snakemake.wildcards.model,
                   benchmark_name=snakemake.wildcards.benchmark, benchmarks_dir=snakemake.params.benchmarks_dir,
                   settings=snakemake.params.settings, out_json=snakemake.output.result,
                   out_items=snakemake.output.predictions, kg_test_file=snakemake.input.kg_test,
                   seed=snakemake.params.seed, trust_remote_code=snakemake.params.trust_remote_code, device=device)

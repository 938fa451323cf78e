# BalancedBio: multi-capability alignment of a biomedical LLM (Capability-Aware GRPO).
# Run:     snakemake --cores all                     (embedded default, CPU, offline)
# Paper:   snakemake --configfile config/paper.yaml --profile profiles/slurm
# Stages live in rules/*.smk; their logic in the balancedbio package (src/).

import os

from snakemake.utils import min_version

min_version("9.0")


# Absolute, so that `--directory elsewhere` still finds the default config.
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


report: "workflow/report/workflow.rst"


localrules:
    all,
    ablations,
    group_size_sweep,
    eval_skipped,
    report,


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/data.smk"
include: "rules/prm.smk"
include: "rules/sft.smk"
include: "rules/grpo.smk"
include: "rules/eval.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        final_targets(),

"""Command line of the training stages, so they can run under ``accelerate launch``.

The Snakemake rules call ``python -m balancedbio.train ...`` on one device and
``accelerate launch ... -m balancedbio.train ...`` on several (see ``balancedbio.launch``).
Settings arrive as one JSON argument: the resolved config sections of the stage.

GRPO also runs from a YAML recipe outside the workflow, parsed by TRL's ``TrlParser`` into
``GRPOScriptArguments`` (paths), ``BalancedGRPOConfig`` and TRL's ``ModelConfig`` (the
policy's folder as ``model_name_or_path``, LoRA as ``use_peft``/``lora_r``/...), open-r1 style:

    python -m balancedbio.train grpo --config recipe.yaml [--aoc_mode monitor ...]
    accelerate launch -m balancedbio.train grpo --config recipe.yaml

Both paths end in ``balancedbio.grpo.run_grpo`` with a ``BalancedGRPOConfig``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from balancedbio.logs import setup_logging
from balancedbio.versions import check_versions

log = logging.getLogger("balancedbio.train")


def run_grpo_recipe(argv: list[str]) -> dict:
    """``grpo --config recipe.yaml [overrides]``: TRL's parser, then the same ``run_grpo``."""
    from trl import ModelConfig, TrlParser, get_peft_config

    from balancedbio.grpo import plot_dynamics, run_grpo
    from balancedbio.training_args import BalancedGRPOConfig, GRPOScriptArguments

    paths, args, model_args = TrlParser((GRPOScriptArguments, BalancedGRPOConfig, ModelConfig)) \
        .parse_args_and_config(argv)
    if not model_args.model_name_or_path:
        raise ValueError("the recipe names no model_name_or_path (the SFT model the policy starts from)")
    if args.use_prm and not paths.prm:
        raise ValueError("use_prm is on but the recipe names no prm folder (set prm, or use_prm: false)")
    summary = run_grpo(model_dir=model_args.model_name_or_path, mcq_path=paths.mcq, prompts_path=paths.prompts,
                       prm_dir=paths.prm, out_dir=paths.out, dynamics_path=paths.dynamics,
                       checkpoint_dir=paths.checkpoints, args=args, peft_config=get_peft_config(model_args),
                       trust_remote_code=args.trust_remote_code)  # GRPOConfig's field
    if paths.figure and int(os.environ.get("RANK", "0")) == 0:
        plot_dynamics(paths.dynamics, paths.figure, title=f"grpo_{args.variant}")
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["grpo"] and "--config" in argv:
        setup_logging(None)
        summary = run_grpo_recipe(argv[1:])
        log.info("final weights %s", summary["final_weights"])
        return
    parser = argparse.ArgumentParser(prog="python -m balancedbio.train", description=__doc__)
    stages = parser.add_subparsers(dest="stage", required=True)
    sft = stages.add_parser("sft", help="supervised fine-tuning")
    sft.add_argument("--model", required=True)
    sft.add_argument("--data", required=True)
    sft.add_argument("--out", required=True)
    sft.add_argument("--metrics", required=True)
    sft.add_argument("--loss-plot", required=True)
    sft.add_argument("--checkpoints", required=True)
    sft.add_argument("--settings", required=True, help="JSON")
    grpo = stages.add_parser("grpo", help="capability-aware GRPO (one variant); or grpo --config recipe.yaml")
    grpo.add_argument("--model", required=True)
    grpo.add_argument("--mcq", required=True)
    grpo.add_argument("--prompts", required=True)
    grpo.add_argument("--prm", default=None)
    grpo.add_argument("--out", required=True)
    grpo.add_argument("--dynamics", required=True)
    grpo.add_argument("--figure", default=None)
    grpo.add_argument("--checkpoints", required=True)
    grpo.add_argument("--settings", required=True, help="JSON")
    args = parser.parse_args(argv)
    setup_logging(None)
    # The rule's environment may differ from the one that planned the run (conda, a cluster node).
    check_versions()
    settings = json.loads(args.settings)
    if args.stage == "sft":
        from balancedbio.sft import run_sft

        run_sft(model_dir=args.model, sft_path=args.data, out_dir=args.out, metrics_path=args.metrics,
                loss_plot=args.loss_plot, checkpoint_dir=args.checkpoints, settings=settings)
    else:
        from balancedbio.grpo import plot_dynamics, run_grpo

        summary = run_grpo(model_dir=args.model, mcq_path=args.mcq, prompts_path=args.prompts, prm_dir=args.prm,
                           out_dir=args.out, dynamics_path=args.dynamics, checkpoint_dir=args.checkpoints,
                           settings=settings)
        if args.figure and int(os.environ.get("RANK", "0")) == 0:
            plot_dynamics(args.dynamics, args.figure, title=f"grpo_{settings['variant']}")
        log.info("final weights %s", summary["final_weights"])


if __name__ == "__main__":
    main()

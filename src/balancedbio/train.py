"""``balancedbio train``: the training stages, one typed way in (also ``python -m balancedbio.train``,
the form ``accelerate launch -m`` starts on several devices; see ``balancedbio.launch``).

GRPO runs from a YAML recipe, parsed by TRL's ``TrlParser`` into ``GRPOScriptArguments`` (paths),
``BalancedGRPOConfig`` and TRL's ``ModelConfig`` (the policy's folder as ``model_name_or_path``,
LoRA as ``use_peft``/``lora_r``/...), open-r1 style; fields given after the recipe override it:

    balancedbio train grpo --config recipe.yaml [--aoc_mode monitor ...]
    accelerate launch -m balancedbio.train grpo --config recipe.yaml

The Snakemake rule writes one recipe per variant (results/grpo_<variant>/recipe.yaml, from the
run's config) and runs this same command on it. SFT takes its paths and its resolved config
section as JSON (``--settings``), as the sft rule passes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from balancedbio.logs import setup_logging
from balancedbio.versions import check_versions

log = logging.getLogger("balancedbio.train")


def train_grpo_recipe(argv: list[str]) -> dict:
    """``grpo --config recipe.yaml [overrides]``: TRL's parser, then ``balancedbio.grpo.train_grpo``."""
    from balancedbio.grpo.run import parse_recipe, train_grpo

    if "--config" not in argv:  # --help lists every field; without a recipe, say what is missing
        from trl import ModelConfig, TrlParser

        from balancedbio.training_args import BalancedGRPOConfig, GRPOScriptArguments

        parser = TrlParser((GRPOScriptArguments, BalancedGRPOConfig, ModelConfig), prog="balancedbio train grpo",
                           description="Capability-aware GRPO from a recipe: balancedbio train grpo --config "
                                       "recipe.yaml [--field value ...]. The recipe (YAML) sets any of the "
                                       "fields below; fields given after it override it.")
        if not {"-h", "--help"} & set(argv):
            parser.error("needs --config recipe.yaml (a GRPO recipe; see config/recipes/)")
        parser.parse_args(argv)
    position = argv.index("--config")
    recipe, overrides = argv[position + 1], argv[:position] + argv[position + 2:]
    return train_grpo(*parse_recipe(recipe, overrides))


def _sft(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="balancedbio train sft", description="Supervised fine-tuning.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--loss-plot", required=True)
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--settings", required=True, help="the resolved sft settings, JSON")
    args = parser.parse_args(argv)
    setup_logging(None)
    check_versions()
    from balancedbio.sft import run_sft

    run_sft(model_dir=args.model, sft_path=args.data, out_dir=args.out, metrics_path=args.metrics,
            loss_plot=args.loss_plot, checkpoint_dir=args.checkpoints, settings=json.loads(args.settings))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage, rest = (argv[0], argv[1:]) if argv else (None, [])
    if stage == "grpo":
        setup_logging(None)
        # The job's environment may differ from the one that planned the run (conda, a cluster node).
        check_versions()
        summary = train_grpo_recipe(rest)
        log.info("final weights %s", summary["final_weights"])
    elif stage == "sft":
        _sft(rest)
    else:
        parser = argparse.ArgumentParser(prog="balancedbio train", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("stage", choices=["grpo", "sft"],
                            help="grpo --config recipe.yaml | sft --model ... (see --help of each)")
        parser.parse_args(argv[:1])


if __name__ == "__main__":
    main()

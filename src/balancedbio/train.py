"""Command line of the training stages, so they can run under ``accelerate launch``.

The Snakemake rules call ``python -m balancedbio.train ...`` on one device and
``accelerate launch ... -m balancedbio.train ...`` on several (see ``balancedbio.launch``).
Settings arrive as one JSON argument: the resolved config section of the stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from balancedbio.logs import setup_logging
from balancedbio.versions import check_versions

log = logging.getLogger("balancedbio.train")


def main(argv: list[str] | None = None) -> None:
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
    grpo = stages.add_parser("grpo", help="capability-aware GRPO (one variant)")
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

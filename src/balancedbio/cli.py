"""The ``balancedbio`` command (``[project.scripts]``; also ``python -m balancedbio``).

    balancedbio train grpo --config recipe.yaml [field overrides]   capability-aware GRPO from a recipe
    balancedbio train sft --model ... --settings JSON                  supervised fine-tuning (the sft rule's)
    balancedbio check-config config.yaml                               validate a workflow config, name bad keys
"""

from __future__ import annotations

import argparse
import sys


def check_config(path: str, base_dir: str | None = None) -> dict:
    """The workflow config at ``path``, validated and with the schema's defaults (ConfigError names a bad key).

    Relative paths in it (benchmarks_dir, training.deepspeed_config) are read against ``base_dir``, the
    folder Snakemake runs from (default: the current one)."""
    from pathlib import Path

    from balancedbio.config import load_config

    return load_config(path, base_dir=Path(base_dir or ".").resolve())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the stage's own parser reads the rest (TRL's for grpo)
        from balancedbio.train import main as train

        train(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="balancedbio", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train a stage: grpo --config recipe.yaml, or sft (see balancedbio train -h)")
    check = commands.add_parser("check-config", help="validate a workflow config against the schema")
    check.add_argument("config", help="a workflow config YAML (config/config.yaml, .test/config/config.yaml ...)")
    check.add_argument("--base-dir", default=None, help="folder its relative paths are read against (default: .)")
    args = parser.parse_args(argv)
    from balancedbio.config import ConfigError

    try:
        config = check_config(args.config, args.base_dir)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    variants = ", ".join(config["grpo"]["variants"])
    print(f"{args.config}: valid (model {config['model']['source']}; GRPO variants {variants})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

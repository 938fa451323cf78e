"""GRPO variants (Table 2 ablations, literature baselines, the group-size sweep) and their settings.

Free of torch/TRL imports on purpose: the Snakefile imports this module to build the DAG, and
every `snakemake` invocation (a dry run included) would otherwise pay for importing them.
"""

from __future__ import annotations

import copy

# Table 2 rows, the literature baselines and the group-size sweep (Figure 2).
ABLATION_VARIANTS = ("no_prm", "no_aoc", "ppo", "dwa", "pcgrad", "gradvac")
DEFAULT_VARIANTS = ("full", "static_weights")
GROUP_SIZES = (4, 8, 16)
# The one regex of the variant names: the rules' wildcard constraints and config checks use it.
VARIANT_PATTERN = "|".join((*DEFAULT_VARIANTS, *ABLATION_VARIANTS)) + "|g[0-9]+"


def variant_settings(config: dict, variant: str) -> dict:
    """The training settings of one variant: the config's, with the variant's one change."""
    settings = {key: copy.deepcopy(config[key]) for key in
                ("grpo", "weights", "aoc", "rewards", "training", "ppo", "seed")}
    settings["trust_remote_code"] = config["model"]["trust_remote_code"]
    settings["variant"] = variant
    settings["use_prm"] = True
    settings["advantage"] = "group"
    if variant == "full":
        pass
    elif variant == "static_weights":
        settings["weights"]["mode"] = "static"
    elif variant == "no_prm":
        settings["use_prm"] = False
    elif variant == "no_aoc":
        settings["aoc"]["mode"] = "off"
    elif variant == "ppo":
        settings["advantage"] = "critic"
    elif variant == "dwa":
        settings["weights"]["mode"] = "dwa"
    elif variant in ("pcgrad", "gradvac"):
        settings["aoc"]["mode"] = "project"
        settings["aoc"]["projection"] = variant
    elif variant.startswith("g") and variant[1:].isdigit() and int(variant[1:]) >= 2:
        settings["grpo"]["num_generations"] = int(variant[1:])
    else:
        raise ValueError(f"unknown GRPO variant {variant!r}: expected one of "
                         f"{', '.join(DEFAULT_VARIANTS + ABLATION_VARIANTS)} or g<group size>")
    return settings

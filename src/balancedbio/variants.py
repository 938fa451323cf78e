"""GRPO variants (Table 2 ablations, literature baselines, the group-size sweep) and their settings.

Free of torch/TRL imports on purpose: the Snakefile imports this module to build the DAG, and
every `snakemake` invocation (a dry run included) would otherwise pay for importing them.
"""

from __future__ import annotations

import copy
import re

# Table 2 rows, the literature baselines and the group-size sweep (Figure 2). `gdpo` and
# `sum_then_normalize` swap eq. 11's advantages for TRL's two aggregations (GDPO; Algorithm 1).
ABLATION_VARIANTS = ("no_prm", "no_aoc", "ppo", "dwa", "pcgrad", "gradvac", "gdpo", "sum_then_normalize")
DEFAULT_VARIANTS = ("full", "static_weights")
GROUP_SIZES = (4, 8, 16)
# The one definition of a valid variant name: the named ones, or g<group size> (the sweep).
# Unanchored, as a Snakemake wildcard constraint wants it; `is_variant` anchors it.
VARIANT_PATTERN = "|".join((*DEFAULT_VARIANTS, *ABLATION_VARIANTS)) + "|g[0-9]+"
AGGREGATION_VARIANTS = {"gdpo": "normalize_then_sum", "sum_then_normalize": "sum_then_normalize"}


def is_variant(name: str) -> bool:
    """Whether ``name`` is a GRPO variant (``g<G>`` needs a group size of at least 2)."""
    if not re.fullmatch(VARIANT_PATTERN, name):
        return False
    return not name[1:].isdigit() or int(name[1:]) >= 2


def variant_settings(config: dict, variant: str) -> dict:
    """The training settings of one variant: the config's, with the variant's one change."""
    settings = {key: copy.deepcopy(config[key]) for key in
                ("grpo", "weights", "aoc", "rewards", "training", "ppo", "seed")}
    # Where the schema gives a run's logging section, its trackers (report_to) go along.
    settings["report_to"] = list((config.get("logging") or {}).get("report_to") or [])
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
        # w/o AOC: the penalty never acts, but S_cos is still measured (monitor: the same two
        # per-capability gradients the update is made of, no probes), so the report can set its
        # |S_cos| beside full's.
        settings["aoc"]["mode"] = "monitor"
    elif variant == "ppo":
        settings["advantage"] = "critic"
    elif variant == "dwa":
        settings["weights"]["mode"] = "dwa"
    elif variant in ("pcgrad", "gradvac"):
        settings["aoc"]["mode"] = "project"
        settings["aoc"]["projection"] = variant
    elif variant in AGGREGATION_VARIANTS:
        settings["grpo"]["advantage_aggregation"] = AGGREGATION_VARIANTS[variant]
    elif variant.startswith("g") and variant[1:].isdigit() and int(variant[1:]) >= 2:
        settings["grpo"]["num_generations"] = int(variant[1:])
    else:
        raise ValueError(f"unknown GRPO variant {variant!r}: expected one of "
                         f"{', '.join(DEFAULT_VARIANTS + ABLATION_VARIANTS)} or g<group size>")
    return settings

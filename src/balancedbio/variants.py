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


# -- a variant's settings as a GRPO recipe (the YAML `balancedbio train grpo --config` reads) ---------
# Config sections that become prefixed fields of BalancedGRPOConfig, and the grpo keys TRL has no field for.
PREFIXED_SECTIONS = ("weights", "aoc", "ppo", "rewards")
GRPO_EXTRA_KEYS = ("prompts_per_step", "max_prompts", "rollout_weights", "advantage_aggregation",
                   "advantage_std_floor", "resample_constant_groups", "precision")
# grpo keys that are GRPOConfig fields of the same name and meaning.
TRL_GRPO_KEYS = ("num_generations", "max_completion_length", "temperature", "beta", "epsilon", "loss_type",
                 "scale_rewards", "max_steps", "save_steps", "use_vllm")


# Where one variant's run writes (rule grpo's outputs; the recipe names the same paths).
GRPO_OUTPUTS = {"out": "results/models/grpo_{variant}", "dynamics": "results/grpo_{variant}/dynamics.jsonl",
                "figure": "results/grpo_{variant}/dynamics.png",
                # Not a rule output: Snakemake would delete it before a rerun, and resuming needs it.
                "checkpoints": "results/grpo_{variant}/checkpoints"}


def grpo_run_paths(variant: str, *, model: str, mcq: str, prompts: str, prm: str) -> dict:
    """The paths of one variant's run: its inputs (the no_prm ablation neither waits for nor loads the
    process reward model) and ``GRPO_OUTPUTS``."""
    return {"model": str(model), "mcq": str(mcq), "prompts": str(prompts),
            "prm": None if variant == "no_prm" else str(prm),
            **{key: pattern.format(variant=variant) for key, pattern in GRPO_OUTPUTS.items()}}


def grpo_recipe(settings: dict, paths: dict, world_size: int = 1) -> dict:
    """The recipe of one variant's ``settings`` (``variant_settings``): BalancedGRPOConfig's fields, TRL's
    ModelConfig (the starting model, LoRA) and the run's ``paths`` (GRPOScriptArguments: mcq, prompts, prm,
    out, dynamics, figure, checkpoints; ``model`` is the starting model). Plain YAML-able values."""
    grpo, training = settings["grpo"], settings["training"]
    lora = training["lora"]
    recipe = {
        "model_name_or_path": paths["model"],
        **{key: paths.get(key) for key in ("mcq", "prompts", "prm", "out", "dynamics", "figure", "checkpoints")},
        "output_dir": paths["checkpoints"],
        # LoRA as TRL's ModelConfig spells it (get_peft_config builds the LoraConfig of models.lora_config).
        "use_peft": training["use_lora"],
        **({"lora_r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
            "lora_target_modules": lora["target_modules"]} if training["use_lora"] else {}),
        "trust_remote_code": settings["trust_remote_code"],
        **{key: grpo[key] for key in TRL_GRPO_KEYS},
        **{f"{section}_{key}": value for section in PREFIXED_SECTIONS for key, value in settings[section].items()},
        **{key: grpo[key] for key in GRPO_EXTRA_KEYS if key in grpo},
        "variant": settings["variant"],
        "use_prm": settings["use_prm"],
        "advantage_estimator": settings["advantage"],
        "seed": settings["seed"],
        "learning_rate": grpo.get("learning_rate") or training["learning_rate"],
        "lr_scheduler_type": training["lr_scheduler_type"],
        "warmup_steps": training["warmup_ratio"],  # transformers 5: a float < 1 is a ratio
        "bf16": training["bf16"],
        "gradient_checkpointing": training["gradient_checkpointing"],
        "gradient_accumulation_steps": 1,
        "logging_steps": 1,  # one dynamics row per optimizer step
        "save_strategy": "steps",
        "save_total_limit": 2,
        "report_to": list(settings.get("report_to") or []),  # the run's logging.report_to
        "vllm_mode": "colocate",
        "log_completions": False,
        "dataloader_num_workers": 0,
    }
    if world_size > 1 and training.get("deepspeed_config"):
        recipe["deepspeed"] = training["deepspeed_config"]
    return recipe


def recipe_settings(args, model_args) -> dict:
    """What a recipe run trains with, in the sections of the workflow config (``grpo_recipe`` read back):
    the checkpoint fingerprint compares it and the trained model's summary records it."""
    lora = {"r": model_args.lora_r, "alpha": model_args.lora_alpha, "dropout": model_args.lora_dropout,
            "target_modules": model_args.lora_target_modules} if model_args.use_peft else None
    return {"variant": args.variant, "use_prm": args.use_prm, "advantage": args.advantage_estimator, "seed": args.seed,
            "trust_remote_code": args.trust_remote_code, "report_to": list(args.report_to or []),
            **{section: args.section(section) for section in PREFIXED_SECTIONS},
            "grpo": {**{key: getattr(args, key) for key in TRL_GRPO_KEYS}, **args.section("grpo"),
                     "learning_rate": args.learning_rate},
            "training": {"lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                         "warmup_ratio": args.warmup_steps, "bf16": args.bf16,
                         "gradient_checkpointing": args.gradient_checkpointing, "deepspeed_config": args.deepspeed,
                         "use_lora": bool(model_args.use_peft), "lora": lora}}

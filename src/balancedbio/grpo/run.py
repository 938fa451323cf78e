"""One GRPO run end to end, from its recipe: the prompt dataset, the trainer, resume from the newest complete
checkpoint, the merged model, ``dynamics.jsonl`` (from the trainer's log history) and the dynamics figure."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from pathlib import Path
from typing import Sequence

from balancedbio.grpo.signals import dynamics_rows
from balancedbio.grpo.trainer import BalancedGRPOTrainer, CriticAdvantageTrainer, StratifiedGRPOTrainer
from balancedbio.models import save_merged
from balancedbio.tracking import keep_tensorboard_events
from balancedbio.variants import grpo_recipe, recipe_settings
from balancedbio.weights import build_weight_controller

log = logging.getLogger(__name__)


def build_prompt_dataset(mcq_path: str, prompts_path: str, *, max_prompts: int | None = None, seed: int = 0):
    """Medical multiple-choice prompts + IFEval-style instruction prompts, one dataset."""
    from datasets import Dataset

    from balancedbio.data.formatting import format_mcq_prompt
    from balancedbio.io import read_jsonl

    medical, instruction = [], []
    for row in read_jsonl(mcq_path):
        medical.append({"prompt": [{"role": "user", "content": format_mcq_prompt(row["question"], row["options"])}],
                        "capability": "medical", "answer": row["answer"], "options": row["options"],
                        "question": row["question"], "instruction_id_list": [], "kwargs": [],
                        "prompt_text": None, "key": row["id"]})
    for row in read_jsonl(prompts_path):
        instruction.append({"prompt": [{"role": "user", "content": row["prompt"]}], "capability": "instruction",
                            "answer": None, "options": None, "question": None,
                            "instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"],
                            "prompt_text": row["prompt"], "key": str(row["key"])})
    if not medical or not instruction:
        raise ValueError(f"GRPO needs both capabilities: {len(medical)} medical prompts in {mcq_path}, "
                         f"{len(instruction)} instruction prompts in {prompts_path}")
    rng = random.Random(seed)
    if max_prompts:
        rng.shuffle(medical)
        rng.shuffle(instruction)
        medical, instruction = medical[:max_prompts // 2], instruction[:max_prompts - max_prompts // 2]
    return Dataset.from_list(medical + instruction)


def parse_recipe(recipe: str | os.PathLike | dict, overrides: Sequence[str] = ()):
    """A recipe (a YAML file, or its content as a dict) through TRL's parser: the paths
    (``GRPOScriptArguments``), the ``BalancedGRPOConfig`` and TRL's ``ModelConfig``."""
    from trl import ModelConfig, TrlParser

    from balancedbio.training_args import BalancedGRPOConfig, GRPOScriptArguments

    parser = TrlParser((GRPOScriptArguments, BalancedGRPOConfig, ModelConfig))
    if isinstance(recipe, dict):
        return tuple(parser.parse_dict(recipe))
    return tuple(parser.parse_args_and_config(["--config", str(recipe), *overrides]))


def grpo_config(settings: dict, output_dir: str, world_size: int = 1):
    """The ``BalancedGRPOConfig`` of one variant's settings, through the recipe the workflow writes."""
    paths = {"model": "", "mcq": "", "prompts": "", "out": "", "dynamics": "", "checkpoints": output_dir}
    return parse_recipe(grpo_recipe(settings, paths, world_size))[1]


def build_trainer(paths, args, model_args, *, callbacks: Sequence = (), vanilla: bool = False,
                  generation_kwargs: dict | None = None):
    """The trainer of one recipe (or, with ``vanilla``, TRL's GRPOTrainer on the same setup and batches)."""
    from trl import get_peft_config

    from balancedbio.models import load_causal_lm, load_tokenizer, training_dtype
    from balancedbio.rewards import build_reward_functions

    model_dir, peft_config = model_args.model_name_or_path, get_peft_config(model_args)
    dataset = build_prompt_dataset(paths.mcq, paths.prompts, max_prompts=args.max_prompts, seed=args.seed)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=args.trust_remote_code)
    model = load_causal_lm(model_dir, dtype=training_dtype(args.bf16, peft_config is not None, args.aoc_mode),
                           trust_remote_code=args.trust_remote_code)
    reward_funcs = build_reward_functions(args.section("rewards"), paths.prm if args.use_prm else None)
    if generation_kwargs:
        args.generation_kwargs = {**(args.generation_kwargs or {}), **generation_kwargs}
    kwargs = dict(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                  processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))
    if vanilla:  # TRL's own step, sampling from the policy as TRL does
        return StratifiedGRPOTrainer(**kwargs), tokenizer
    kwargs["rollout_weights"] = args.rollout_weights
    kwargs.update(weight_controller=build_weight_controller(args.section("weights"), [f.name for f in reward_funcs]),
                  aoc_config=args.section("aoc"))
    if args.advantage_estimator == "critic":
        return CriticAdvantageTrainer(**kwargs, critic_model_dir=model_dir, ppo_config=args.section("ppo")), tokenizer
    return BalancedGRPOTrainer(**kwargs), tokenizer


def train_grpo(paths, args, model_args, callbacks: Sequence = ()) -> dict:
    """Train one recipe (``parse_recipe``); resumes from the newest checkpoint in ``paths.checkpoints``."""
    from transformers import set_seed

    from balancedbio.checkpoints import (CompletionMarker, disk_full_named, last_complete_checkpoint,
                                         training_fingerprint)
    from balancedbio.grpo.curves import add_heldout_curves

    if not model_args.model_name_or_path:
        raise ValueError("the recipe names no model_name_or_path (the SFT model the policy starts from)")
    if args.use_prm and not paths.prm:
        raise ValueError("use_prm is on but the recipe names no prm folder (set prm, or use_prm: false)")
    checkpoint_root = Path(paths.checkpoints)
    args.output_dir = str(checkpoint_root)  # checkpoints and resume live there
    set_seed(args.seed)
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    # Resume only a checkpoint of this very run (same settings and inputs); claims the folder.
    settings = recipe_settings(args, model_args)
    fingerprint = training_fingerprint(settings, {"model": model_args.model_name_or_path, "mcq": paths.mcq,
                                                  "prompts": paths.prompts, "prm": paths.prm})
    last = last_complete_checkpoint(checkpoint_root, fingerprint)
    if last:
        # The checkpoint's trainer_state.json holds the log history up to it: the dynamics resume with it.
        log.info("resuming %s from %s (step %s)", args.variant, last, Path(last).name.split("-")[-1])

    trainer, tokenizer = build_trainer(paths, args, model_args, callbacks=[CompletionMarker(fingerprint), *callbacks])
    keep_tensorboard_events(trainer, checkpoint_root)
    add_heldout_curves(trainer, paths.dynamics)  # learning curves, when a curve set lies beside the dynamics
    controller, dataset = trainer.weight_controller, trainer.train_dataset
    log.info("GRPO %s: %d prompts (%d medical), G=%d, %d prompts/step, %d steps, weights=%s, aoc=%s, "
             "advantages=%s", args.variant, len(dataset), sum(c == "medical" for c in dataset["capability"]),
             args.num_generations, args.prompts_per_step, args.max_steps, args.weights_mode, args.aoc_mode,
             args.advantage_aggregation)
    log.info("GRPO precision: %s weights, %s (grpo.precision %s); AOC penalty gradient: %s",
             next(trainer.model.parameters()).dtype, "bf16 autocast" if args.bf16 else "no autocast", args.precision,
             args.aoc_penalty_gradient)
    with disk_full_named(checkpoint_root):  # a save that fills the disk: one line, no partial checkpoint
        result = trainer.train(resume_from_checkpoint=last)
    summary = {"variant": args.variant, "global_step": trainer.state.global_step,
               "train_runtime_s": result.metrics.get("train_runtime"), "resumed_from": last,
               "final_weights": dict(zip(controller.names, controller.weights)),
               "final_success": dict(zip(controller.names, controller.success)),
               "settings": settings}
    # Every rank: under ZeRO-3 the weights are gathered from all of them (only the main process writes).
    save_merged(trainer, tokenizer, paths.out, {"balancedbio_training.json": summary}, every_rank=True)
    if trainer.accelerator.is_main_process:
        from balancedbio.io import atomic_file

        with atomic_file(paths.dynamics) as handle:
            for row in dynamics_rows(trainer.state.log_history, controller.names):
                handle.write(json.dumps(row) + "\n")
        shutil.rmtree(checkpoint_root, ignore_errors=True)
        if paths.figure:
            plot_dynamics(paths.dynamics, paths.figure, title=f"grpo_{args.variant}")
    return summary


def run_grpo(*, model_dir: str, mcq_path: str, prompts_path: str, prm_dir: str | None, out_dir: str,
             dynamics_path: str, checkpoint_dir: str, settings: dict, figure_path: str | None = None,
             callbacks: Sequence = ()) -> dict:
    """Train one variant from its workflow ``settings`` (``variant_settings``), through the very recipe the
    Snakemake rule writes for it (``grpo_recipe``): for scripts and tests that hold a config, not a recipe."""
    paths = {"model": model_dir, "mcq": mcq_path, "prompts": prompts_path, "prm": prm_dir, "out": out_dir,
             "dynamics": dynamics_path, "figure": figure_path, "checkpoints": checkpoint_dir}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return train_grpo(*parse_recipe(grpo_recipe(settings, paths, world_size)), callbacks=callbacks)


def read_dynamics(path: str | os.PathLike) -> list[dict]:
    from balancedbio.io import read_jsonl

    return list(read_jsonl(path))


def plot_dynamics(dynamics_path: str, figure_path: str, title: str = "") -> None:
    """Weights, success rates, reward components and S_cos against the step (Figures 3-4)."""
    from balancedbio.io import pyplot, save_figure

    plt = pyplot()
    rows = read_dynamics(dynamics_path)
    steps = [r["step"] for r in rows]
    names = sorted({k[len("weight_"):] for r in rows for k in r if k.startswith("weight_")})
    fig, axes = plt.subplots(3, 2, figsize=(10, 9), sharex=True)
    panels = [("weight_", "reward weight w_k"), ("success_", "success rate S_k (EMA)"),
              ("reward_", "reward component mean")]
    for ax, (prefix, label) in zip(axes.flat, panels):
        for name in names:
            values = [r.get(prefix + name) for r in rows]
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], marker="o", markersize=2,
                        label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes.flat[3]
    s_cos = [float("nan") if r.get("s_cos") is None else r["s_cos"] for r in rows]
    ax.plot(steps, s_cos, marker="o", markersize=2, color="tab:purple", label="S_cos")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylabel("S_cos (medical vs instruction gradient)")
    # Symmetric about 0 and scaled to the values: at |S_cos| ~ 0.03 a [-1, 1] axis shows a flat line.
    finite = [abs(v) for v in s_cos if not math.isnan(v)]
    limit = min(1.05, max(0.05, 1.2 * max(finite))) if finite else 1.05
    ax.set_ylim(-limit, limit)
    ax.grid(alpha=0.3)
    ax = axes.flat[4]
    if "instruction" in names:  # eq. 11: the instruction rows' share of sum |A| follows w_inst / sum w
        shares = [r.get("weight_instruction") / sum(r[f"weight_{n}"] for n in names)
                  if all(r.get(f"weight_{n}") is not None for n in names) else float("nan") for r in rows]
        ax.plot(steps, shares, marker="o", markersize=2, label="w_inst / sum w")
    ax.plot(steps, [float("nan") if r.get("update_share_instruction") is None else r["update_share_instruction"]
                    for r in rows], marker="o", markersize=2, label="instruction share of sum |A|")
    ax.set_ylabel("instruction share")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes.flat[5]
    ax.plot(steps, [float("nan") if r.get("kl") is None else r["kl"] for r in rows], marker="o", markersize=2,
            color="tab:brown")
    ax.set_ylabel("KL to the reference")
    ax.grid(alpha=0.3)
    for ax in axes[2]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title or "GRPO training dynamics")
    save_figure(fig, figure_path)

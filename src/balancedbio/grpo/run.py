"""One GRPO variant end to end: the prompt dataset, the ``BalancedGRPOConfig``, the trainer, ``dynamics.jsonl``,
resume from the newest complete checkpoint, the merged model, and the dynamics figure."""

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
from balancedbio.models import lora_config, save_merged
from balancedbio.tracking import keep_tensorboard_events
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


def grpo_config(settings: dict, output_dir: str, world_size: int = 1, deepspeed: str | None = None):
    """The ``BalancedGRPOConfig`` of one variant's settings (``balancedbio.variants.variant_settings``)."""
    from balancedbio.training_args import GRPO_EXTRA_KEYS, PREFIXED_SECTIONS, BalancedGRPOConfig

    grpo, training = settings["grpo"], settings["training"]
    same_name = {key: grpo[key] for key in ("num_generations", "max_completion_length", "temperature", "beta",
                                            "epsilon", "loss_type", "scale_rewards", "max_steps", "save_steps",
                                            "use_vllm")}
    ours = {f"{section}_{key}": value for section in PREFIXED_SECTIONS for key, value in settings[section].items()}
    ours.update({key: grpo[key] for key in GRPO_EXTRA_KEYS if key in grpo})
    return BalancedGRPOConfig(
        output_dir=output_dir,
        **same_name,
        **ours,
        variant=settings["variant"],
        use_prm=settings["use_prm"],
        advantage_estimator=settings["advantage"],
        gradient_accumulation_steps=1,
        learning_rate=grpo.get("learning_rate") or training["learning_rate"],
        lr_scheduler_type=training["lr_scheduler_type"],
        warmup_steps=training["warmup_ratio"],  # transformers 5: a float < 1 is a ratio
        logging_steps=1,
        save_strategy="steps",
        save_total_limit=2,
        bf16=training["bf16"],
        gradient_checkpointing=training["gradient_checkpointing"],
        seed=settings["seed"],
        report_to=list(settings.get("report_to") or []),  # the run's logging.report_to (variant_settings)
        vllm_mode="colocate",
        deepspeed=deepspeed if world_size > 1 else None,
        log_completions=False,
        dataloader_num_workers=0,
    )


def build_trainer(*, model_dir: str, mcq_path: str, prompts_path: str, prm_dir: str | None, output_dir: str,
                  settings: dict | None = None, args=None, peft_config=None, trust_remote_code: bool = False,
                  world_size: int = 1, deepspeed: str | None = None, callbacks: Sequence = (),
                  vanilla: bool = False, generation_kwargs: dict | None = None):
    """The trainer of one variant (or, with ``vanilla``, TRL's GRPOTrainer on the same setup and batches).

    Either ``settings`` (a variant's settings dict, as the Snakemake rule passes them) or ``args``
    (a ``BalancedGRPOConfig``, as a recipe gives it, with ``peft_config`` and ``trust_remote_code``).
    """
    from balancedbio.models import load_causal_lm, load_tokenizer, training_dtype
    from balancedbio.rewards import build_reward_functions

    if settings is not None:
        args = grpo_config(settings, output_dir, world_size, deepspeed)
        peft_config = lora_config(settings["training"]) if settings["training"]["use_lora"] else None
        trust_remote_code = settings["trust_remote_code"]
    elif args is None:
        raise ValueError("build_trainer needs settings or args")
    dataset = build_prompt_dataset(mcq_path, prompts_path, max_prompts=args.max_prompts, seed=args.seed)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model = load_causal_lm(model_dir, dtype=training_dtype(args.bf16, peft_config is not None, args.aoc_mode),
                           trust_remote_code=trust_remote_code)
    reward_funcs = build_reward_functions(args.section("rewards"), prm_dir if args.use_prm else None)
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


def run_grpo(*, model_dir: str, mcq_path: str, prompts_path: str, prm_dir: str | None, out_dir: str,
             dynamics_path: str, checkpoint_dir: str, settings: dict | None = None, args=None, peft_config=None,
             trust_remote_code: bool = False, callbacks: Sequence = ()) -> dict:
    """Train one variant; resumes from the newest checkpoint in ``checkpoint_dir``.

    ``settings`` (the Snakemake rule's) or ``args`` + ``peft_config`` (a recipe's), as in ``build_trainer``.
    """
    from transformers import set_seed

    from balancedbio.checkpoints import CompletionMarker, last_complete_checkpoint, training_fingerprint

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    checkpoint_root = Path(checkpoint_dir)
    if settings is not None:
        args = grpo_config(settings, str(checkpoint_root), world_size, settings["training"].get("deepspeed_config"))
        peft_config = lora_config(settings["training"]) if settings["training"]["use_lora"] else None
        trust_remote_code = settings["trust_remote_code"]
    elif args is None:
        raise ValueError("run_grpo needs settings or args")
    else:
        args.output_dir = str(checkpoint_root)  # checkpoints and resume live there
    set_seed(args.seed)
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    # Resume only a checkpoint of this very run (same settings and inputs); claims the folder.
    fingerprint = training_fingerprint(settings if settings is not None else args.to_dict(), {"model": model_dir, "mcq": mcq_path, "prompts": prompts_path,
                                                  "prm": prm_dir})
    last = last_complete_checkpoint(checkpoint_root, fingerprint)
    if last:
        step = int(Path(last).name.split("-")[-1])
        # The checkpoint's trainer_state.json holds the log history up to it: the dynamics resume with it.
        log.info("resuming %s from %s (step %d)", args.variant, last, step)

    trainer, tokenizer = build_trainer(
        model_dir=model_dir, mcq_path=mcq_path, prompts_path=prompts_path, prm_dir=prm_dir, args=args,
        peft_config=peft_config, trust_remote_code=trust_remote_code, output_dir=str(checkpoint_root),
        callbacks=[CompletionMarker(fingerprint), *callbacks])
    keep_tensorboard_events(trainer, checkpoint_root)
    controller, reward_funcs, dataset = trainer.weight_controller, trainer.reward_funcs, trainer.train_dataset
    log.info("GRPO %s: %d prompts (%d medical), G=%d, %d prompts/step, %d steps, weights=%s, aoc=%s, "
             "advantages=%s", args.variant, len(dataset), sum(c == "medical" for c in dataset["capability"]),
             args.num_generations, args.prompts_per_step, args.max_steps, args.weights_mode, args.aoc_mode,
             args.advantage_aggregation)
    result = trainer.train(resume_from_checkpoint=last)
    summary = {"variant": args.variant, "global_step": trainer.state.global_step,
               "train_runtime_s": result.metrics.get("train_runtime"), "resumed_from": last,
               "final_weights": dict(zip(controller.names, controller.weights)),
               "final_success": dict(zip(controller.names, controller.success)),
               "reward_stats": {f.name: dict(getattr(f, "stats", {})) for f in reward_funcs},
               "settings": settings if settings is not None else _recipe_settings(args)}
    if trainer.accelerator.is_main_process:
        save_merged(trainer, tokenizer, out_dir, {"balancedbio_training.json": summary})
        from balancedbio.io import atomic_file

        with atomic_file(dynamics_path) as handle:
            for row in dynamics_rows(trainer.state.log_history, controller.names):
                handle.write(json.dumps(row) + "\n")
        shutil.rmtree(checkpoint_root, ignore_errors=True)
    return summary


def _recipe_settings(args) -> dict:
    """What a recipe run trained with, in the sections of the workflow config (for the model's summary)."""
    from balancedbio.training_args import PREFIXED_SECTIONS

    return {"variant": args.variant, "use_prm": args.use_prm, "advantage": args.advantage_estimator,
            "seed": args.seed, **{section: args.section(section) for section in (*PREFIXED_SECTIONS, "grpo")}}


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

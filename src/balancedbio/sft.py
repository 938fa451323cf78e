"""Supervised fine-tuning (the stage before GRPO) with TRL's ``SFTTrainer``.

Each conversation becomes a conversational *prompt-completion* pair: every turn up to the
last assistant message is the prompt, the last assistant message the completion. TRL applies
the model's chat template and, with ``completion_only_loss``, computes the loss on the
completion tokens only, i.e. on the assistant's answer, never on the question. (TRL's
``assistant_only_loss`` would also cover earlier assistant turns but needs a chat template
with ``{% generation %}`` markers, which SmolLM2's and Qwen2.5's templates do not have; the
data here is single-turn.) LoRA (peft) or full fine-tuning by config; the result is always a
plain safetensors folder (LoRA merged) so GRPO starts from it like from any model.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Sequence

from balancedbio.io import DataFormatError, read_jsonl

log = logging.getLogger(__name__)


def conversation_pairs(sft_path: str, *, max_examples: int | None = None, seed: int = 0,
                       val_examples: int = 0) -> tuple[list[dict], list[dict]]:
    """(training pairs, validation pairs): one seeded shuffle, the validation pairs taken first.

    The validation pairs are never trained on, so the loss on them before and after SFT says
    whether the model learned the task rather than the examples.
    """
    import random

    pairs = []
    for line_number, row in enumerate(read_jsonl(sft_path), start=1):
        messages = row.get("messages")
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataFormatError(f"{sft_path}:{line_number}: 'messages' must be a list of at least two turns")
        for turn in messages:
            if not isinstance(turn, dict) or turn.get("role") not in {"system", "user", "assistant"} \
                    or not isinstance(turn.get("content"), str):
                raise DataFormatError(f"{sft_path}:{line_number}: every turn needs a role (system/user/assistant) "
                                      f"and string content, got {str(turn)[:80]!r}")
        if messages[-1]["role"] != "assistant":
            raise DataFormatError(f"{sft_path}:{line_number}: the last turn must be the assistant's, "
                                  f"not {messages[-1]['role']!r}")
        pairs.append({"prompt": messages[:-1], "completion": [messages[-1]],
                      "capability": row.get("capability", "medical")})
    if not pairs:
        raise DataFormatError(f"{sft_path}: no conversations")
    if val_examples and val_examples >= len(pairs):
        raise DataFormatError(f"sft.val_examples = {val_examples} leaves no training conversation in {sft_path} "
                              f"({len(pairs)} conversations)")
    if val_examples or (max_examples and len(pairs) > max_examples):
        random.Random(seed).shuffle(pairs)
    validation, pairs = pairs[:val_examples], pairs[val_examples:]
    if max_examples and len(pairs) > max_examples:
        pairs = pairs[:max_examples]
    return pairs, validation


def plot_loss(log_history: list[dict], path: str) -> None:
    from balancedbio.io import pyplot, save_figure

    plt = pyplot()
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if points:
        ax.plot(*zip(*points), marker="o", markersize=2, label="training batches")
    validation = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if validation:
        ax.plot(*zip(*validation), marker="s", linestyle="--", color="C3", label="held-out validation")
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.set_title("SFT")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def run_sft(*, model_dir: str, sft_path: str, out_dir: str, metrics_path: str, loss_plot: str, checkpoint_dir: str,
            settings: dict, callbacks: Sequence = ()) -> dict:
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from balancedbio.models import lora_config, save_merged
    from balancedbio.io import write_json
    from balancedbio.checkpoints import (CompletionMarker, disk_full_named, last_complete_checkpoint,
                                         training_fingerprint)
    from balancedbio.models import bf16_autocast, load_causal_lm, load_tokenizer, training_dtype
    from balancedbio.tracking import keep_tensorboard_events

    sft, training = settings["sft"], settings["training"]
    set_seed(settings["seed"])
    # Resume only a checkpoint of this very run (same settings, model and data); claims the folder.
    fingerprint = training_fingerprint(settings, {"model": model_dir, "data": sft_path})
    last = last_complete_checkpoint(checkpoint_dir, fingerprint)
    pairs, validation = conversation_pairs(sft_path, max_examples=sft["max_examples"], seed=settings["seed"],
                                           val_examples=sft["val_examples"])
    dataset = Dataset.from_list(pairs)
    autocast = bf16_autocast(sft["mixed_precision"], "sft.mixed_precision", training["bf16"])
    tokenizer = load_tokenizer(model_dir, trust_remote_code=settings["trust_remote_code"])
    model = load_causal_lm(model_dir, dtype=training_dtype(training["bf16"], training["use_lora"]),
                           trust_remote_code=settings["trust_remote_code"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = SFTConfig(
        output_dir=checkpoint_dir,
        max_length=training["max_length"],
        completion_only_loss=True,
        packing=False,
        per_device_train_batch_size=sft["batch_size"],
        gradient_accumulation_steps=sft["gradient_accumulation_steps"],
        learning_rate=sft["learning_rate"],
        lr_scheduler_type=training["lr_scheduler_type"],
        warmup_steps=training["warmup_ratio"],
        num_train_epochs=sft["epochs"],
        max_steps=sft["max_steps"] or -1,
        logging_steps=sft["logging_steps"],
        save_strategy="steps",
        save_steps=sft["save_steps"],
        save_total_limit=2,
        bf16=autocast,  # fp32 weights under bf16 autocast unless training.bf16 loads bf16 weights
        use_cpu=autocast and not torch.cuda.is_available(),  # transformers' bf16 check wants it said
        per_device_eval_batch_size=sft["batch_size"],
        gradient_checkpointing=training["gradient_checkpointing"],
        seed=settings["seed"],
        report_to=settings["logging"]["report_to"],
        deepspeed=training.get("deepspeed_config") if world_size > 1 else None,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         eval_dataset=Dataset.from_list(validation) if validation else None, processing_class=tokenizer,
                         peft_config=lora_config(training) if training["use_lora"] else None,
                         callbacks=[CompletionMarker(fingerprint), *callbacks])
    keep_tensorboard_events(trainer, checkpoint_dir)
    if last:
        log.info("resuming SFT from %s", last)
    log.info("SFT on %d conversations (%s), %s", len(pairs),
             ", ".join(f"{c}: {sum(p['capability'] == c for p in pairs)}" for c in sorted({p['capability']
                                                                                          for p in pairs})),
             "LoRA" if training["use_lora"] else "full fine-tuning")
    log.info("SFT precision: %s", "fp32 weights, bf16 autocast" if autocast and not training["bf16"]
             else "bf16" if training["bf16"] else "fp32")
    # Before = the starting model (LoRA adapters are zero at init), also when resuming.
    val_before = trainer.evaluate()["eval_loss"] if validation else None
    with disk_full_named(checkpoint_dir):
        result = trainer.train(resume_from_checkpoint=last)
    val_after = trainer.evaluate()["eval_loss"] if validation else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {"examples": len(pairs), "global_step": trainer.state.global_step,
               "train_runtime_s": result.metrics.get("train_runtime"), "train_loss": result.training_loss,
               "first_logged_loss": losses[0] if losses else None, "last_logged_loss": losses[-1] if losses else None,
               "val_examples": len(validation), "val_loss_before": val_before, "val_loss_after": val_after,
               "mixed_precision": "bf16" if autocast else "fp32",
               "lora": training["use_lora"], "resumed_from": last,
               "log_history": [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]}
    # Every rank: under ZeRO-3 the weights are gathered from all of them (only the main process writes).
    save_merged(trainer, tokenizer, out_dir, {"balancedbio_training.json": {k: v for k, v in metrics.items()
                                                                           if k != "log_history"}}, every_rank=True)
    if trainer.accelerator.is_main_process:
        write_json(metrics_path, metrics)
        plot_loss(trainer.state.log_history, loss_plot)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info("SFT done: training loss %s -> %s over %d steps; validation loss %s -> %s (%d conversations)",
             metrics["first_logged_loss"], metrics["last_logged_loss"], metrics["global_step"], val_before, val_after,
             len(validation))
    return metrics


def sft_settings(config: dict) -> dict:
    return {"sft": config["sft"], "training": config["training"], "seed": config["seed"],
            "trust_remote_code": config["model"]["trust_remote_code"], "logging": config["logging"]}

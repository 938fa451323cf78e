"""A tiny SFT job for the kill tests in test_faults.py: run_sft on a 2-layer random Llama.

usage: python fault_sft_job.py WORKDIR LEARNING_RATE SECONDS_PER_STEP [SAVE_STEPS [CHECKPOINT_DIR]]
Builds WORKDIR/model and WORKDIR/sft.jsonl on first use; checkpoints go to WORKDIR/checkpoints
(or CHECKPOINT_DIR), one every SAVE_STEPS steps (default 1). WORKDIR/progress holds the last
finished step.
"""

import json
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from balancedbio.logs import setup_logging

WORDS = ["<pad>", "<unk>", "<eos>", "user", "assistant"] + [f"w{i}" for i in range(27)]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
            "{% if add_generation_prompt %}assistant {% endif %}")


def build_inputs(workdir: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>")
    tokenizer.chat_template = TEMPLATE
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=0, eos_token_id=2,
                                         bos_token_id=None))
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    rows = [{"messages": [{"role": "user", "content": f"w{i} w{i + 1}"},
                          {"role": "assistant", "content": f"w{i + 2} w{i + 3}"}]} for i in range(8)]
    (workdir / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


class Slow(TrainerCallback):
    """Leaves the test time to kill the job between two checkpoints."""

    def __init__(self, seconds: float, progress: Path):
        self.seconds, self.progress = seconds, progress

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.write_text(str(state.global_step))
        time.sleep(self.seconds)



def build_grpo_inputs(workdir: Path) -> tuple[Path, Path]:
    """``build_inputs`` plus one medical and one instruction prompt in the tiny vocabulary (mcq, prompts)."""
    import json

    build_inputs(workdir)
    mcq, prompts = workdir / "mcq.jsonl", workdir / "prompts.jsonl"
    mcq.write_text(json.dumps({"id": "m1", "question": "w1 w2", "options": {"A": "w3", "B": "w4"},
                               "answer": "A"}) + "\n")
    prompts.write_text(json.dumps({"key": 1, "prompt": "w5 w6", "instruction_id_list": ["punctuation:no_comma"],
                                   "kwargs": [{}]}) + "\n")
    return mcq, prompts

def main() -> None:
    workdir, learning_rate, seconds = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    save_steps = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    checkpoint_dir = sys.argv[5] if len(sys.argv) > 5 else str(workdir / "checkpoints")
    setup_logging(workdir / "job.log")
    if not (workdir / "model").exists():
        build_inputs(workdir)
    from balancedbio.sft import run_sft

    settings = {"seed": 0, "trust_remote_code": False,
                "training": {"max_length": 32, "lr_scheduler_type": "linear", "warmup_ratio": 0.0, "bf16": False,
                             "gradient_checkpointing": False, "use_lora": False, "deepspeed_config": None},
                "sft": {"max_examples": None, "batch_size": 2, "gradient_accumulation_steps": 1,
                        "learning_rate": learning_rate, "epochs": 10, "max_steps": 6, "logging_steps": 1,
                        "save_steps": save_steps, "val_examples": 0, "mixed_precision": "fp32"},
                "logging": {"report_to": []}}
    run_sft(model_dir=str(workdir / "model"), sft_path=str(workdir / "sft.jsonl"), out_dir=str(workdir / "out"),
            metrics_path=str(workdir / "metrics.json"), loss_plot=str(workdir / "loss.png"),
            checkpoint_dir=checkpoint_dir, settings=settings, callbacks=[Slow(seconds, workdir / "progress")])


if __name__ == "__main__":
    main()

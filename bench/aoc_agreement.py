"""AOC's probes and passes against fp32 and the exact double backward, on a tiny random Llama with TRL's loss.

For each of N seeded batches (random weights and rows), on the real ``BalancedGRPOTrainer`` code:
- the penalty's gradient, grad S_cos^2, from the probes vs the exact double backward (cosine):
  forward differences with "old" log-probs pinned at the base pass (what the trainer does), with
  TRL's own "old" (the bug of issue 25.1), and on bf16 weights (a forward difference, as before,
  and the exact H.v by a double backward, what the trainer now does there);
- the capability passes under bf16 autocast vs fp32: |S_cos| error and the cosine of g_R, g_I;
- the forward-difference probe with every pass under bf16 autocast vs the fp32 exact gradient.

python bench/aoc_agreement.py [--seeds 5]  -> bench/results/aoc_agreement.{json,md}
CPU only: TF32 is a CUDA matmul mode and is not measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
VOCAB = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(61)]
ROWS, PROMPT, COMPLETION = 16, 4, 8


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def make_trainer(seed: int, out: str, dtype=torch.float32):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig

    from balancedbio.grpo import BalancedGRPOTrainer
    from balancedbio.rewards import AccuracyReward, InstructionReward
    from balancedbio.weights import PIDWeights

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    dataset = Dataset.from_list([{"prompt": "w1 w2", "capability": "medical", "answer": "A"},
                                 {"prompt": "w3 w4", "capability": "instruction", "answer": None}])
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=ROWS, num_generations=2, beta=0.0,
                      max_completion_length=COMPLETION, loss_type="grpo", report_to=[], use_cpu=True, bf16=False)
    trainer = BalancedGRPOTrainer(model=LlamaForCausalLM(config).to(dtype),
                                  reward_funcs=[AccuracyReward(), InstructionReward()], args=args,
                                  train_dataset=dataset, processing_class=_tokenizer(),
                                  weight_controller=PIDWeights(["accuracy", "instruction"]),
                                  aoc_config={"mode": "penalty", "tau": 0.0, "micro_batch_rows": 4})
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def make_batch(seed: int) -> dict:
    generator = torch.Generator().manual_seed(1000 + seed)
    lengths = torch.randint(3, COMPLETION + 1, (ROWS,), generator=generator)
    return {"prompt_ids": torch.randint(3, len(VOCAB), (ROWS, PROMPT), generator=generator),
            "prompt_mask": torch.ones(ROWS, PROMPT, dtype=torch.long),
            "completion_ids": torch.randint(3, len(VOCAB), (ROWS, COMPLETION), generator=generator),
            "completion_mask": (torch.arange(COMPLETION).unsqueeze(0) < lengths.unsqueeze(1)).long(),
            "advantages": 2 * torch.randn(ROWS, generator=generator),
            "is_medical": torch.arange(ROWS) % 2 == 0,
            "num_items_in_batch": lengths.sum().float()}


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.detach().float().reshape(-1) for g in grads])


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(_flat(a), _flat(b), dim=0))


def _passes(trainer, inputs, *, autocast: bool, exact: bool):
    """(g_R, g_I, S_cos, grad S_cos^2) with the trainer's own passes, fp32 or under bf16 autocast."""
    from balancedbio.aoc import cosine_from_gramian, gramian
    from balancedbio.grpo.aoc_passes import _fp32_forward

    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    context = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast else _fp32_forward(trainer, model))
    with context:
        g_r, g_i, _ = trainer.capability_gradients(model, inputs, params, differentiable=exact)
        gram = gramian(g_r, g_i)
        cosine = cosine_from_gramian(gram)
        if exact:
            penalty = torch.autograd.grad(cosine ** 2, params)
        else:
            if autocast:  # the probes' own fp32 switch would undo the autocast under test
                import balancedbio.grpo.aoc as module

                original, module._fp32_forward = module._fp32_forward, lambda *a: contextlib.nullcontext()
            try:
                penalty = trainer._penalty_gradient_fd(model, params, g_r, g_i, float(cosine.detach()), gram)
            finally:
                if autocast:
                    module._fp32_forward = original
    return g_r, g_i, float(cosine.detach()), penalty


def measure(seed: int, out: str) -> dict:
    from balancedbio.grpo import aoc_passes

    inputs = make_batch(seed)
    fp32 = make_trainer(seed, out)
    g_r, g_i, cosine, exact = _passes(fp32, inputs, autocast=False, exact=True)
    _, _, _, probe = _passes(fp32, inputs, autocast=False, exact=False)
    row = {"seed": seed, "s_cos": cosine, "fd_pinned": _cos(probe, exact)}
    # TRL's own "old" (the shifted weights' log-probs): drop the pinned ones from the stored chunks.
    original = fp32.capability_gradients

    def unpinned(*args, **kwargs):
        out_ = original(*args, **kwargs)
        fp32._capability_parts = [None if c is None else [({k: v for k, v in p.items() if k != "old_per_token_logps"},
                                                           s, r) for p, s, r in c] for c in fp32._capability_parts]
        return out_

    fp32.capability_gradients = unpinned
    row["fd_trl_old"] = _cos(_passes(fp32, inputs, autocast=False, exact=False)[3], exact)
    fp32.capability_gradients = original
    # bf16 weights: the same weights rounded to bf16; the fp32 exact reference on those rounded weights.
    bf16 = make_trainer(seed, out, torch.bfloat16)
    reference = make_trainer(seed, out)
    with torch.no_grad():
        for p, q in zip(reference.model.parameters(), bf16.model.parameters()):
            p.copy_(q.float())
    exact_rounded = _passes(reference, inputs, autocast=False, exact=True)[3]
    row["bf16_weights_exact_hvp"] = _cos(_passes(bf16, inputs, autocast=False, exact=False)[3], exact_rounded)
    full_precision = aoc_passes.full_precision
    import balancedbio.grpo.aoc as module

    module.full_precision = lambda params: True  # force the forward difference on bf16 weights (the old path)
    try:
        row["bf16_weights_fd"] = _cos(_passes(bf16, inputs, autocast=False, exact=False)[3], exact_rounded)
    finally:
        module.full_precision = full_precision
    # bf16 autocast over fp32 weights.
    a_r, a_i, a_cos, a_probe = _passes(fp32, inputs, autocast=True, exact=False)
    row.update(autocast_s_cos_error=abs(a_cos - cosine), autocast_cos_g_r=_cos(a_r, g_r),
               autocast_cos_g_i=_cos(a_i, g_i), autocast_fd=_cos(a_probe, exact),
               autocast_g_r_relative_error=float((_flat(a_r) - _flat(g_r)).norm() / _flat(g_r).norm()))
    module.full_precision = lambda params: False  # the exact H.v under autocast
    try:
        row["autocast_exact_hvp"] = _cos(_passes(fp32, inputs, autocast=True, exact=False)[3], exact)
    finally:
        module.full_precision = full_precision
    return row


COLUMNS = [("fd_pinned", "FD probe, old pinned at the base pass (fp32)"),
           ("fd_trl_old", "FD probe, TRL's own old (before the fix)"),
           ("bf16_weights_fd", "bf16 weights: FD probe (before)"),
           ("bf16_weights_exact_hvp", "bf16 weights: exact H.v (double backward, now)"),
           ("autocast_cos_g_r", "bf16 autocast: cos(g_R, fp32 g_R)"),
           ("autocast_cos_g_i", "bf16 autocast: cos(g_I, fp32 g_I)"),
           ("autocast_g_r_relative_error", "bf16 autocast: relative error of g_R"),
           ("autocast_s_cos_error", "bf16 autocast: abs S_cos error"),
           ("autocast_fd", "bf16 autocast: FD probe"),
           ("autocast_exact_hvp", "bf16 autocast: exact H.v (double backward)")]


def table(rows: list[dict]) -> str:
    lines = [f"n = {len(rows)} seeded batches ({ROWS} rows, {COMPLETION}-token completions; |S_cos| "
             f"{min(abs(r['s_cos']) for r in rows):.3f}-{max(abs(r['s_cos']) for r in rows):.3f}); cosine "
             "with the fp32 exact double backward unless said otherwise.", "",
             "| quantity | mean | min | max |", "|---|---:|---:|---:|"]
    for key, label in COLUMNS:
        values = [r[key] for r in rows]
        lines.append(f"| {label} | {statistics.mean(values):.4f} | {min(values):.4f} | {max(values):.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(seed, tmp) for seed in range(args.seeds)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aoc_agreement.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (out / "aoc_agreement.md").write_text(table(rows), encoding="utf-8")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

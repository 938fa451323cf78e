"""Rollout (generation) throughput of the policy against the machine's fp32 matmul bound.

A GRPO step on CPU is dominated by sampling G completions per prompt. This script measures
completion tokens per second for the settings a user can change, on the real model and the real
GRPO prompts, and compares each to the compute bound: a decoder needs about 2 x params FLOPs per
generated token, so tokens/s <= (measured fp32 matmul FLOP/s) / (2 x params).

    .venv/bin/python bench/rollout.py                       # needs results/models/{base|sft} and the clean data
    .venv/bin/python bench/rollout.py --settings trl_default no_cache --repeats 5

Each setting generates ``--prompts`` x ``--group`` completions of exactly ``--tokens`` tokens
(EOS suppressed with ``min_new_tokens``), ``--repeats`` times, interleaved with the other
settings so machine noise hits all of them alike; min / median / max are reported.
Writes bench/results/rollout.json and bench/results/rollout.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from balancedbio.grpo import build_prompt_dataset, lora_config  # noqa: E402
from balancedbio.models import load_causal_lm, load_tokenizer  # noqa: E402

# name -> (description, options). Options: lora (unmerged adapters, as during GRPO), cache,
# batch ("step": every completion of the step in one generate call, "group": one call per
# prompt's group, "one": one call per completion), threads, dtype, compile.
SETTINGS = {
    "trl_default": ("as TRL runs it: LoRA adapters, KV cache, whole step in one batch, 2 threads, fp32",
                    {}),
    "no_cache": ("without the KV cache (what gradient checkpointing in train mode forces)", {"cache": False}),
    "per_group": ("one generate call per prompt (G completions each)", {"batch": "group"}),
    "per_completion": ("one generate call per completion", {"batch": "one"}),
    "merged": ("LoRA merged into the weights before sampling", {"lora": False}),
    "one_thread": ("torch.set_num_threads(1)", {"threads": 1}),
    "bf16": ("bfloat16 weights (LoRA adapters too)", {"dtype": torch.bfloat16}),
    "merged_bf16": ("LoRA merged, then a bfloat16 copy of the weights samples", {"lora": False, "dtype": torch.bfloat16}),
    "autocast_bf16": ("fp32 weights under torch.autocast(bfloat16)", {"autocast": True}),
    "static_compile": ("static KV cache + torch.compile of the forward", {"compile": True}),
}
DEFAULTS = {"lora": True, "cache": True, "batch": "step", "threads": 2, "dtype": torch.float32, "compile": False,
            "autocast": False}
# Slow enough that one repeat tells the story (run them with --settings ... --repeats 1).
SLOW = {"no_cache", "per_completion", "static_compile"}


def matmul_flops(size: int = 1024, seconds: float = 3.0, dtype=torch.float32) -> float:
    """Sustained FLOP/s of a square matmul (the compute bound of a dense decoder)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size ** 3 * count / (time.perf_counter() - start)


def step_prompts(tokenizer, results: Path, prompts: int, seed: int) -> list[str]:
    """The first GRPO step's prompts (alternating medical / instruction), chat-templated."""
    dataset = build_prompt_dataset(str(results / "data" / "clean" / "mcq_train.jsonl"),
                                   str(results / "data" / "clean" / "prompts.jsonl"), max_prompts=None, seed=seed)
    medical = [row for row in dataset if row["capability"] == "medical"]
    instruction = [row for row in dataset if row["capability"] != "medical"]
    chosen = [(medical if i % 2 == 0 else instruction)[i // 2] for i in range(prompts)]
    return [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            for row in chosen]


def parameter_count(model_dir: str) -> int:
    """Parameters of the saved model, read from the safetensors headers (no second model load)."""
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def build_model(model_dir: str, options: dict):
    model = load_causal_lm(model_dir, dtype="float32")
    if options["lora"]:
        from peft import get_peft_model

        from balancedbio.config import load_config

        training = load_config(REPO / "config" / "config.yaml", base_dir=REPO)["training"]
        model = get_peft_model(model, lora_config(training))
    model = model.to(options["dtype"]).eval()
    if options["compile"]:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, dynamic=False)
    return model


def generate(model, tokenizer, texts: list[str], group: int, tokens: int, options: dict) -> int:
    """Sample ``group`` completions per text; returns the number of completion tokens."""
    rows = [text for text in texts for _ in range(group)]
    if options["batch"] == "step":
        batches = [rows]
    elif options["batch"] == "group":
        batches = [rows[i:i + group] for i in range(0, len(rows), group)]
    else:
        batches = [[row] for row in rows]
    produced = 0
    for batch in batches:
        inputs = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=options["autocast"]):
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=tokens, min_new_tokens=tokens, use_cache=options["cache"],
                                 pad_token_id=tokenizer.pad_token_id)
        produced += (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    return produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(REPO / "results"))
    parser.add_argument("--model", default="sft", help="folder under results/models")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=[s for s in SETTINGS if s not in SLOW],
                        choices=list(SETTINGS))
    args = parser.parse_args()
    results = Path(args.results)
    model_dir = str(results / "models" / args.model)
    tokenizer = load_tokenizer(model_dir)
    texts = step_prompts(tokenizer, results, args.prompts, seed=42)
    prompt_tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

    torch.set_num_threads(2)
    flops = {"fp32": matmul_flops(dtype=torch.float32), "bf16": matmul_flops(dtype=torch.bfloat16, seconds=2.0)}
    params = parameter_count(model_dir)
    bound = flops["fp32"] / (2 * params)
    print(f"fp32 matmul {flops['fp32'] / 1e9:.1f} GFLOP/s, bf16 {flops['bf16'] / 1e9:.1f} GFLOP/s; "
          f"{params / 1e6:.1f}M params -> bound {bound:.0f} tokens/s", flush=True)

    models, seconds = {}, {name: [] for name in args.settings}
    for name in args.settings:
        options = {**DEFAULTS, **SETTINGS[name][1]}
        models[name] = (build_model(model_dir, options), options)
        torch.set_num_threads(options["threads"])
        generate(models[name][0], tokenizer, texts[:1], 1, 4, options)  # warm-up (and compile)
    produced = {}
    for repeat in range(args.repeats):  # interleaved: repeat r of every setting before repeat r+1
        for name in args.settings:
            model, options = models[name]
            torch.set_num_threads(options["threads"])
            torch.manual_seed(repeat)
            start = time.perf_counter()
            produced[name] = generate(model, tokenizer, texts, args.group, args.tokens, options)
            seconds[name].append(time.perf_counter() - start)
            print(f"repeat {repeat + 1}: {name} {seconds[name][-1]:.2f} s", flush=True)
    torch.set_num_threads(2)

    rows = []
    for name in args.settings:
        med = statistics.median(seconds[name])
        rate = produced[name] / med
        rows.append({"setting": name, "description": SETTINGS[name][0], "seconds": seconds[name],
                     "min_s": min(seconds[name]), "median_s": med, "max_s": max(seconds[name]),
                     "tokens": produced[name], "tokens_per_s": rate, "fraction_of_bound": rate / bound})
    setup = (f"{args.model} model ({params / 1e6:.1f}M params), {args.prompts} prompts x G={args.group}, "
             f"{args.tokens} completion tokens each (prompts of {min(prompt_tokens)}-{max(prompt_tokens)} tokens), "
             f"{args.repeats} interleaved repeats; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}")
    lines = [setup, "",
             f"fp32 matmul (1024^3): **{flops['fp32'] / 1e9:.1f} GFLOP/s**; bf16: {flops['bf16'] / 1e9:.1f} GFLOP/s. "
             f"Compute bound at 2 x params FLOPs/token: **{bound:.0f} tokens/s**.", "",
             "| setting | what | s per step (min / median / max) | tokens/s (median) | of the bound |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['setting']}` | {r['description']} | {r['min_s']:.2f} / {r['median_s']:.2f} / "
                     f"{r['max_s']:.2f} | {r['tokens_per_s']:.0f} | {100 * r['fraction_of_bound']:.0f}% |")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout.json").write_text(json.dumps({"setup": setup, "flops": flops, "params": params,
                                                  "bound_tokens_per_s": bound, "rows": rows}, indent=2) + "\n")
    (out / "rollout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Seconds per GRPO optimizer step: TRL's GRPOTrainer vs BalancedGRPOTrainer, side by side.

Every configuration runs on the same model, prompts, G, completion length and seed; EOS is
suppressed until ``max_completion_length`` tokens (``min_new_tokens``) so every step generates
exactly the same number of tokens and the timings compare the trainers, not the luck of the
sampler. The first step (warm-up: PRM load, allocator) is reported but left out of the mean.
The vanilla baseline is TRL's ``GRPOTrainer`` with only its sampler swapped for the stratified
one (``StratifiedGRPOTrainer``), so both trainers see the same prompts at every step.

    .venv/bin/python bench/grpo_step.py --steps 5            # needs a finished `make run`
    .venv/bin/python bench/grpo_step.py --configs vanilla full

Writes bench/results/grpo_step.json and a markdown table (bench/results/grpo_step.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from balancedbio.config import load_config  # noqa: E402
from balancedbio.grpo import build_trainer, variant_settings  # noqa: E402

# name -> (vanilla TRL?, changes to the `full` settings)
CONFIGS = {
    "vanilla": (True, {"weights": {"mode": "static"}, "aoc": {"mode": "off"}}),
    "full": (False, {}),
    "pid_only": (False, {"aoc": {"mode": "off"}}),
    "monitor": (False, {"aoc": {"mode": "monitor"}}),
    "project": (False, {"aoc": {"mode": "project", "projection": "pcgrad"}}),
}
DESCRIPTIONS = {
    "vanilla": "TRL `GRPOTrainer` (same stratified batches), same rewards, static weights",
    "full": "BalancedGRPOTrainer: PID weights + AOC `penalty` (the `full` variant)",
    "pid_only": "PID weights, AOC `off` (the `no_aoc` variant)",
    "monitor": "PID weights, AOC `monitor` (S_cos logged only)",
    "project": "PID weights, AOC `project` (PCGrad via torchjd)",
}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.started, self.seconds = None, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def _merge(settings: dict, changes: dict) -> dict:
    for key, value in changes.items():
        settings[key] = {**settings[key], **value} if isinstance(value, dict) else value
    return settings


def run(name: str, config: dict, steps: int, results: Path) -> dict:
    vanilla, changes = CONFIGS[name]
    settings = _merge(variant_settings(config, "full"), changes)
    settings["grpo"].update(max_steps=steps, save_steps=10 ** 6)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build_trainer(
            model_dir=str(results / "models" / "sft"), mcq_path=str(results / "data" / "clean" / "mcq_train.jsonl"),
            prompts_path=str(results / "data" / "clean" / "prompts.jsonl"), prm_dir=str(results / "models" / "prm"),
            settings=settings, output_dir=tmp, callbacks=[timer], vanilla=vanilla,
            generation_kwargs={"min_new_tokens": settings["grpo"]["max_completion_length"]})
        trainer.train()
    del trainer
    gc.collect()
    measured = timer.seconds[1:] or timer.seconds
    return {"config": name, "description": DESCRIPTIONS[name], "step_seconds": timer.seconds,
            "mean_s": statistics.mean(measured), "median_s": statistics.median(measured)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    parser.add_argument("--results", default=str(REPO / "results"), help="a finished run's results folder")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    config = load_config(args.config, base_dir=REPO)
    rows = [run(name, config, args.steps, Path(args.results)) for name in args.configs]
    base = next((r["mean_s"] for r in rows if r["config"] == "vanilla"), None)
    grpo = config["grpo"]
    header = (f"G={grpo['num_generations']}, {grpo['prompts_per_step']} prompts/step, "
              f"{grpo['max_completion_length']} completion tokens, LoRA={config['training']['use_lora']}, "
              f"{args.steps} steps each (first excluded from the mean)")
    lines = [header, "", "| configuration | mean s/step | median s/step | vs vanilla TRL |", "|---|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['mean_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['description']} | {r['mean_s']:.2f} | {r['median_s']:.2f} | {ratio} |")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_step.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=2) + "\n")
    (out / "grpo_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

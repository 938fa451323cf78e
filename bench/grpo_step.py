"""Seconds per GRPO optimizer step: TRL's GRPOTrainer vs BalancedGRPOTrainer, side by side.

Every configuration runs on the same model, prompts, G, completion length and seed; EOS is
suppressed until ``max_completion_length`` tokens (``min_new_tokens``) so every step generates
exactly the same number of tokens and the timings compare the trainers, not the luck of the
sampler. The first step (warm-up: PRM load, allocator) is reported but left out of the mean.
The vanilla baseline is TRL's ``GRPOTrainer`` with only its sampler swapped for the stratified
one (``StratifiedGRPOTrainer``), so both trainers see the same prompts at every step.

    .venv/bin/python bench/grpo_step.py                       # needs a finished `make run`
    .venv/bin/python bench/grpo_step.py --configs vanilla full --rounds 3 --steps 5

Each run is its own process (peak RSS from getrusage); runs are interleaved round by round
(vanilla, full, ..., vanilla, full, ...) and the ratio to vanilla is taken per round.

Writes bench/results/grpo_step.json and a markdown table (bench/results/grpo_step.md).
"""

from __future__ import annotations

import argparse
import resource
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from balancedbio.config import load_config  # noqa: E402
from balancedbio.grpo.run import build_trainer, parse_recipe  # noqa: E402
from balancedbio.variants import grpo_recipe, variant_settings  # noqa: E402

# name -> (vanilla TRL?, changes to the `full` settings)
CONFIGS = {
    "vanilla": (True, {"weights": {"mode": "static"}, "aoc": {"mode": "off"}}),
    "full": (False, {}),
    "full_policy_rollout": (False, {"grpo": {"rollout_weights": "policy"}}),
    "pid_only": (False, {"aoc": {"mode": "off"}}),
    "monitor": (False, {"aoc": {"mode": "monitor"}}),
    "project": (False, {"aoc": {"mode": "project", "projection": "pcgrad"}}),
    # Issue 23's levers, each against `full` as configured: no KL term (no reference forward), AOC on
    # every 2nd / 4th step only.
    "full_beta0": (False, {"grpo": {"beta": 0.0}}),
    "full_beta004": (False, {"grpo": {"beta": 0.04}}),
    "full_interval2": (False, {"aoc": {"interval": 2}}),
    "full_interval4": (False, {"aoc": {"interval": 4}}),
    # bf16 autocast on the CPU (training.bf16): TRL's loss and monitor's passes in bf16, penalty's in fp32.
    "full_bf16": (False, {"grpo": {"beta": 0.0}, "training": {"bf16": True}}),
    "full_bf16_interval2": (False, {"grpo": {"beta": 0.0}, "training": {"bf16": True}, "aoc": {"interval": 2}}),
    "full_bf16_hvp": (False, {"grpo": {"beta": 0.0}, "training": {"bf16": True},
                              "aoc": {"penalty_gradient": "hessian_vector"}}),
    "vanilla_bf16": (True, {"weights": {"mode": "static"}, "aoc": {"mode": "off"}, "grpo": {"beta": 0.0},
                            "training": {"bf16": True}}),
    "monitor_bf16": (False, {"grpo": {"beta": 0.0}, "training": {"bf16": True}, "aoc": {"mode": "monitor"}}),
}
DESCRIPTIONS = {
    "vanilla": "TRL `GRPOTrainer` (same stratified batches), same rewards, static weights",
    "full": "BalancedGRPOTrainer: PID weights + AOC `penalty` (the `full` variant, rollouts from the merged copy)",
    "full_policy_rollout": "`full`, but sampling from the LoRA policy itself as TRL does (`rollout_weights: policy`)",
    "pid_only": "PID weights, AOC `off` (the `no_aoc` variant)",
    "monitor": "PID weights, AOC `monitor` (S_cos logged only)",
    "project": "PID weights, AOC `project` (PCGrad via torchjd)",
    "full_beta0": "`full` with `beta: 0` (no KL term, no reference forward)",
    "full_beta004": "`full` with `beta: 0.04` (KL term, reference forward every step)",
    "full_interval2": "`full` with `aoc.interval: 2`",
    "full_interval4": "`full` with `aoc.interval: 4`",
    "full_bf16": "`full`, beta 0, `training.bf16` (CPU bf16 autocast; the penalty's passes stay fp32)",
    "full_bf16_interval2": "`full_bf16` with `aoc.interval: 2`",
    "full_bf16_hvp": "`full_bf16` with `aoc.penalty_gradient: hessian_vector` (every AOC pass in bf16 autocast, exact H v probes)",
    "vanilla_bf16": "TRL `GRPOTrainer` (same stratified batches, rewards, static weights), beta 0, bf16 autocast",
    "monitor_bf16": "the `no_aoc` variant (AOC `monitor`), beta 0, `training.bf16`",
}


class StepTimer(TrainerCallback):
    """Wall seconds per step, and this process's CPU seconds per step: on a shared machine (more runnable
    threads than cores) wall time measures the neighbours, while a one-thread run's CPU time is its own work."""

    def __init__(self):
        self.started, self.seconds, self.cpu_seconds = None, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started[0])
        self.cpu_seconds.append(time.process_time() - self.started[1])


# Where a step's time goes: TRL methods wrapped with a stopwatch (nested phases are subtracted
# in the table: "loss + backward" = training_step - generate-and-score).
PHASES = {
    "generate": "_generate",
    "rewards": "_calculate_rewards",
    "generate_and_score": "_generate_and_score_completions",
    "training_step": "training_step",
    # Inside training_step when AOC is on: the per-capability gradients, and the penalty's
    # finite-difference probes (only on steps where it fires).
    "capability_gradients": "capability_gradients",
    "penalty_probes": "_penalty_gradient_fd",
}


# Phases in CPU seconds with --cpu-time (set in the worker), else wall seconds.
CLOCK = time.perf_counter


def _time_phases(trainer) -> dict[str, list[float]]:
    spent: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for phase, method in PHASES.items():
        if not hasattr(trainer, method):  # TRL's own trainer has no AOC phases
            continue
        original = getattr(trainer, method)

        def timed(*args, _original=original, _phase=phase, **kwargs):
            start = CLOCK()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_phase].append(CLOCK() - start)

        setattr(trainer, method, timed)
    return spent


def _merge(settings: dict, changes: dict) -> dict:
    for key, value in changes.items():
        settings[key] = {**settings[key], **value} if isinstance(value, dict) else value
    return settings


def worker(name: str, config_path: str, steps: int, results: Path) -> dict:
    """One configuration, in its own process (so its peak RSS is its own)."""
    config = load_config(config_path, base_dir=REPO)
    vanilla, changes = CONFIGS[name]
    settings = _merge(variant_settings(config, "full"), changes)
    settings["grpo"].update(max_steps=steps, save_steps=10 ** 6)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"model": str(results / "models" / "sft"), "mcq": str(results / "data" / "clean" / "mcq_train.jsonl"),
                 "prompts": str(results / "data" / "clean" / "prompts.jsonl"), "prm": str(results / "models" / "prm"),
                 "out": tmp, "dynamics": f"{tmp}/dynamics.jsonl", "checkpoints": tmp}
        trainer, _ = build_trainer(
            *parse_recipe(grpo_recipe(settings, paths)), callbacks=[timer], vanilla=vanilla,
            generation_kwargs={"min_new_tokens": settings["grpo"]["max_completion_length"]})
        phases = _time_phases(trainer)
        trainer.train()
    return {"config": name, "step_seconds": timer.seconds, "step_cpu_seconds": timer.cpu_seconds, "phases": phases,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    parser.add_argument("--results", default=str(REPO / "results"), help="a finished run's results folder")
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is warm-up, not counted)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds: every configuration once per round")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--cpu-time", action="store_true",
                        help="report CPU seconds of the (one-thread) process instead of wall seconds: on a shared "
                             "machine wall time measures the other jobs")
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, args.config, args.steps, Path(args.results))))
        return

    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for name in args.configs:  # interleaved, so drift of the machine hits every configuration alike
                out = Path(tmp) / f"{name}_{round_index}.json"
                subprocess.run([sys.executable, __file__, "--worker", name, "--out", str(out), "--config", args.config,
                                "--results", args.results, "--steps", str(args.steps),
                                *(["--cpu-time"] if args.cpu_time else [])], check=True)
                if args.cpu_time:  # the table's seconds are the process's own CPU seconds
                    run_json = json.loads(out.read_text())
                    run_json["step_seconds"] = run_json["step_cpu_seconds"]
                    out.write_text(json.dumps(run_json))
                run = json.loads(out.read_text())
                runs[name].append(run)
                print(f"round {round_index + 1} {name}: " + ", ".join(f"{s:.1f}" for s in run["step_seconds"])
                      + f" s/step, peak {run['peak_rss_mb']:.0f} MB", flush=True)

    rows = []
    for name in args.configs:
        steps = [s for run in runs[name] for s in run["step_seconds"][1:]]  # first step of each run: warm-up
        phases = {}
        for phase in PHASES:
            values = [v for run in runs[name] for v in run["phases"][phase][1:]]
            phases[phase] = statistics.median(values) if values else 0.0
        rows.append({"config": name, "description": DESCRIPTIONS[name], "step_seconds": steps,
                     "median_s": statistics.median(steps), "min_s": min(steps), "max_s": max(steps),
                     "phases_median_s": phases, "peak_rss_mb": max(run["peak_rss_mb"] for run in runs[name]),
                     "runs": runs[name]})
    base = next((r for r in rows if r["config"].startswith("vanilla")), None)
    for r in rows:  # ratio per round: each configuration against the vanilla run of the same round
        if base:
            ratios = [statistics.median(run["step_seconds"][1:]) / statistics.median(ref["step_seconds"][1:])
                      for run, ref in zip(r["runs"], base["runs"])]
            r["ratio_vs_vanilla"] = {"per_round": ratios, "min": min(ratios), "median": statistics.median(ratios),
                                     "max": max(ratios), "of_medians": r["median_s"] / base["median_s"]}
    grpo = load_config(args.config, base_dir=REPO)["grpo"]
    header = (f"G={grpo['num_generations']}, {grpo['prompts_per_step']} prompts/step, "
              f"{grpo['max_completion_length']} completion tokens, {'CPU' if args.cpu_time else 'wall'} seconds, "
              f"{args.rounds} interleaved rounds x "
              f"{args.steps} steps per configuration (the first step of each run is warm-up, not counted)")
    lines = [header, "",
             "| configuration | s/step min / median / max | vs vanilla: median of all steps | per-round ratio "
             "min / median / max | peak RSS (MB) |", "|---|---|---:|---|---:|"]
    for r in rows:
        ratio = r.get("ratio_vs_vanilla")
        lines.append(f"| {r['description']} | {_spread(r['step_seconds'])} | "
                     f"{ratio['of_medians']:.2f}x | {_spread(ratio['per_round'])} | {r['peak_rss_mb']:,.0f} |"
                     if ratio else f"| {r['description']} | {_spread(r['step_seconds'])} | - | - | "
                     f"{r['peak_rss_mb']:,.0f} |")
    lines += ["", "Median seconds per step by phase (`generate` is inside `generate + score`, which is inside "
              "`training_step`; the rest of a step is the optimizer and logging):", "",
              "| configuration | generate | rewards | generate + score | loss + backward (+ AOC) | rest of step |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["phases_median_s"]
        lines.append(f"| `{r['config']}` | {p['generate']:.2f} | {p['rewards']:.2f} | {p['generate_and_score']:.2f} | "
                     f"{p['training_step'] - p['generate_and_score']:.2f} | "
                     f"{max(0.0, r['median_s'] - p['training_step']):.2f} |")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_step.json").write_text(json.dumps({"setup": header, "rows": rows}, indent=2) + "\n")
    (out / "grpo_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

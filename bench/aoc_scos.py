"""How often S_cos is defined and how large |S_cos| is: a short GRPO run with ``aoc.mode: monitor``.

The measurement behind ``aoc.tau`` and the default batch shape (README, AOC). It trains the
`full` variant of a config with AOC only logging, reads the run's dynamics and prints: the
fraction of steps with S_cos defined (both capabilities have a non-zero advantage), the
quantiles of |S_cos| over those steps, and for each candidate tau the fraction of steps on
which the penalty would fire.

    .venv/bin/python bench/aoc_scos.py --workdir RUN --steps 12 --prompts-per-step 4 --num-generations 4

RUN is a working directory in which `snakemake results/models/base results/data/clean/prompts.jsonl`
ran (and optionally results/models/sft and results/models/prm; without them the run starts from the
prepared base model and scores without the PRM, as the `no_prm` variant does).
Writes RUN/results/aoc_scos/{dynamics.jsonl,summary.json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from balancedbio.config import load_config  # noqa: E402
from balancedbio.grpo import read_dynamics, run_grpo, variant_settings  # noqa: E402

TAUS = (0.01, 0.02, 0.03, 0.05, 0.1)


def summarise(rows: list[dict]) -> dict:
    values = [abs(r["s_cos"]) for r in rows if r.get("s_cos") is not None]
    notes: dict[str, int] = {}
    for r in rows:
        if r.get("s_cos") is None:
            notes[r.get("aoc_note") or "undefined"] = notes.get(r.get("aoc_note") or "undefined", 0) + 1
    quantiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) >= 2 else []
    return {"steps": len(rows), "defined": len(values), "defined_fraction": len(values) / max(len(rows), 1),
            "abs_s_cos": sorted(values), "abs_s_cos_quartiles": quantiles,
            "abs_s_cos_median": statistics.median(values) if values else None,
            "undefined_because": notes,
            "fires_fraction_by_tau": {str(tau): sum(v > tau for v in values) / max(len(rows), 1) for tau in TAUS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts-per-step", type=int)
    parser.add_argument("--num-generations", type=int)
    args = parser.parse_args()
    work = args.workdir.resolve()
    settings = variant_settings(load_config(args.config, base_dir=REPO), "full")
    settings["aoc"] = {**settings["aoc"], "mode": "monitor"}
    grpo = settings["grpo"]
    grpo.update(max_steps=args.steps, save_steps=args.steps)
    if args.prompts_per_step:
        grpo["prompts_per_step"] = args.prompts_per_step
    if args.num_generations:
        grpo["num_generations"] = args.num_generations
    models = work / "results" / "models"
    model = models / "sft" if (models / "sft").exists() else models / "base"
    prm = models / "prm" if (models / "prm").exists() else None
    settings["use_prm"] = prm is not None
    out = work / "results" / "aoc_scos"
    run_grpo(model_dir=str(model), mcq_path=str(work / "results/data/clean/mcq_train.jsonl"),
             prompts_path=str(work / "results/data/clean/prompts.jsonl"), prm_dir=str(prm) if prm else None,
             out_dir=str(out / "model"), dynamics_path=str(out / "dynamics.jsonl"),
             checkpoint_dir=str(out / "checkpoints"), settings=settings)
    summary = {"model": str(model), "prm": str(prm) if prm else None, "prompts_per_step": grpo["prompts_per_step"],
               "num_generations": grpo["num_generations"], **summarise(read_dynamics(out / "dynamics.jsonl"))}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Evaluation questions per second: the pipeline's settings vs lm-eval's defaults, same tasks and items.

Both sides run through the same code path as the ``evaluate`` rule
(``balancedbio.evaluation.evaluate_benchmark``), on the same seeded subset of each benchmark;
only the lm-eval settings differ:

- ``pipeline``: config/config.yaml's ``eval`` section (batch 8, chat template, IFEval capped at
  ``ifeval_max_tokens`` new tokens);
- ``lm-eval defaults``: what ``lm_eval --model hf --tasks ...`` does without options: batch size 1,
  no chat template, the task's own ``max_gen_toks`` for IFEval (1280).

Seconds include loading the model (as in the rule) but not the Python imports. A warm-up evaluation runs first; runs alternate
between the two settings (``--repeats`` rounds), min / median / max are reported.

    .venv/bin/python bench/eval_throughput.py                     # needs results/models/base
    .venv/bin/python bench/eval_throughput.py --benchmarks medqa --repeats 3

Writes bench/results/eval_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from balancedbio.config import load_config  # noqa: E402
from balancedbio.evaluation import evaluate_benchmark  # noqa: E402

LM_EVAL_DEFAULTS = {"batch_size": 1, "apply_chat_template": False, "ifeval_max_tokens": 1280}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    parser.add_argument("--results", default=str(REPO / "results"))
    parser.add_argument("--model", default="base")
    parser.add_argument("--benchmarks", nargs="+", default=["mmlu_med", "medqa", "cmexam", "kg_mcq", "ifeval"])
    parser.add_argument("--ifeval-limit", type=int, default=4,
                        help="IFEval prompts (lm-eval's default allows 1280 new tokens each)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    config = load_config(args.config, base_dir=REPO)
    ours = dict(config["eval"])
    ours["limit"] = {**(ours.get("limit") or {}), "ifeval": args.ifeval_limit}
    sides = {"pipeline": ours, "lm-eval defaults": {**ours, **LM_EVAL_DEFAULTS}}
    results = Path(args.results)
    seconds: dict[tuple[str, str], list[float]] = {}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        evaluate = functools.partial(
            evaluate_benchmark, model_dir=str(results / "models" / args.model), model_name=args.model,
            benchmarks_dir=config["benchmarks_dir"], out_json=f"{tmp}/r.json", out_items=f"{tmp}/r.jsonl",
            kg_test_file=str(results / "data" / "kg" / "mcq_test.jsonl"), seed=config["seed"])
        # Warm-up (lazy imports, first kernels): the first evaluation in a process is ~10 s slower.
        evaluate(benchmark_name="kg_mcq", settings={**ours, "limit": {"kg_mcq": 2}})
        for repeat in range(args.repeats):
            for index, benchmark in enumerate(args.benchmarks):
                order = list(sides.items())
                if (index + repeat) % 2:  # alternate which side goes first
                    order.reverse()
                for side, settings in order:
                    result = evaluate(benchmark_name=benchmark, settings=settings)
                    if result.get("status") != "ok":
                        raise SystemExit(f"{benchmark}: {result.get('reason')}")
                    seconds.setdefault((benchmark, side), []).append(result["seconds"])
                    counts[benchmark] = result["n"]
                    print(f"round {repeat + 1} {benchmark} {side}: n={result['n']} {result['seconds']:.1f} s",
                          flush=True)
    rows, lines = [], [
        f"Model `{args.model}`; the same seeded items on both sides ({args.repeats} round(s), alternating).", "",
        "| benchmark | n | pipeline s (min / median / max) | q/s | lm-eval defaults s (min / median / max) | q/s "
        "| speed-up |", "|---|---:|---|---:|---|---:|---:|"]
    for benchmark in args.benchmarks:
        ours_s, default_s = seconds[(benchmark, "pipeline")], seconds[(benchmark, "lm-eval defaults")]
        n = counts[benchmark]
        row = {"benchmark": benchmark, "n": n, "pipeline_s": ours_s, "defaults_s": default_s,
               "pipeline_qps": n / statistics.median(ours_s), "defaults_qps": n / statistics.median(default_s)}
        rows.append(row)
        lines.append(f"| {benchmark} | {n} | {min(ours_s):.1f} / {statistics.median(ours_s):.1f} / {max(ours_s):.1f} "
                     f"| {row['pipeline_qps']:.2f} | {min(default_s):.1f} / {statistics.median(default_s):.1f} / "
                     f"{max(default_s):.1f} | {row['defaults_qps']:.2f} | "
                     f"{row['pipeline_qps'] / row['defaults_qps']:.1f}x |")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_throughput.json").write_text(json.dumps({"settings": {k: {kk: v[kk] for kk in LM_EVAL_DEFAULTS}
                                                                       for k, v in sides.items()},
                                                          "rows": rows}, indent=2) + "\n")
    (out / "eval_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

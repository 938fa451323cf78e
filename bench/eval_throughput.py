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

``--sweep`` instead measures what sets the evaluation budget of ``make run``: questions per
second of each benchmark, one thread (as an ``evaluate`` job runs), for weights in fp32 and bf16
and several batch sizes, in wall seconds and in CPU seconds of the process (the machine may be
shared: CPU seconds are what a job costs when it has its core to itself), plus the held-out
reward generation (``balancedbio.heldout``). Writes bench/results/eval_sweep.{json,md}.

    .venv/bin/python bench/eval_throughput.py --sweep --gen-limit 16 --mcq-limit 60
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
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
    parser.add_argument("--sweep", action="store_true", help="q/s per benchmark, fp32 vs bf16, batch sizes")
    parser.add_argument("--gen-limit", type=int, default=16, help="--sweep: prompts per generation benchmark")
    parser.add_argument("--mcq-limit", type=int, default=60, help="--sweep: questions per multiple-choice set")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[128])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="--sweep: weights to compare")
    args = parser.parse_args()
    if args.sweep:
        return sweep(args)
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


def _timed(call):
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def sweep(args) -> None:
    import torch

    from balancedbio.heldout import generate_answers, heldout_questions

    torch.set_num_threads(1)  # an evaluate job has one core (config resources.evaluate)
    config = load_config(args.config, base_dir=REPO)
    results = Path(args.results)
    model_dir = str(results / "models" / args.model)
    kg_test = str(results / "data" / "kg" / "mcq_test.jsonl")
    rows = []

    def record(benchmark, dtype, batch, tokens, n, wall, cpu):
        row = {"benchmark": benchmark, "dtype": dtype, "batch_size": batch, "max_tokens": tokens, "n": n,
               "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "q_per_wall_s": round(n / wall, 3),
               "q_per_cpu_s": round(n / cpu, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        evaluate = functools.partial(evaluate_benchmark, model_dir=model_dir, model_name=args.model,
                                     benchmarks_dir=config["benchmarks_dir"], out_json=f"{tmp}/r.json",
                                     out_items=f"{tmp}/r.jsonl", kg_test_file=kg_test, seed=config["seed"])
        evaluate(benchmark_name="kg_mcq", settings={**config["eval"], "limit": {"kg_mcq": 2}})  # warm-up
        for benchmark in [b for b in args.benchmarks if b in ("ifeval", "ifbench")]:
            for tokens in args.max_tokens:
                for dtype, batch in [("float32", 8)] * ("float32" in args.dtypes) + [
                        ("bfloat16", b) for b in args.batch_sizes if "bfloat16" in args.dtypes]:
                    settings = {**config["eval"], "dtype": dtype, "batch_size": batch, "ifeval_max_tokens": tokens,
                                "limit": {benchmark: args.gen_limit}}
                    result, wall, cpu = _timed(lambda: evaluate(benchmark_name=benchmark, settings=settings))
                    record(benchmark, dtype, batch, tokens, result["n"], wall, cpu)
        if "heldout" in args.benchmarks:
            prompts = [q["prompt"] for q in heldout_questions(kg_test, args.gen_limit, config["seed"])]
            for tokens in args.max_tokens:
                for dtype, batch in [("float32", 16)] * ("float32" in args.dtypes) + [
                        ("bfloat16", b) for b in args.batch_sizes if "bfloat16" in args.dtypes]:
                    _, wall, cpu = _timed(lambda: generate_answers(model_dir, prompts, max_new_tokens=tokens,
                                                                   batch_size=batch, dtype=dtype))
                    record("heldout (kg questions)", dtype, batch, tokens, len(prompts), wall, cpu)
        for benchmark in [b for b in args.benchmarks if b in ("mmlu_med", "medqa", "cmexam", "kg_mcq")]:
            limit = max(1, args.mcq_limit // 6) if benchmark == "mmlu_med" else args.mcq_limit
            for dtype in args.dtypes:
                settings = {**config["eval"], "dtype": dtype, "limit": {benchmark: limit}}
                result, wall, cpu = _timed(lambda: evaluate(benchmark_name=benchmark, settings=settings))
                record(benchmark, dtype, settings["batch_size"], None, result["n"], wall, cpu)
    lines = [f"Model `{args.model}`, one thread; wall and CPU seconds of the evaluation call (model load included).",
             "", "| benchmark | dtype | batch | max new tokens | n | wall s | CPU s | q/s (wall) | q/s (CPU) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['benchmark']} | {r['dtype']} | {r['batch_size']} | {r['max_tokens'] or '-'} | {r['n']} | "
              f"{r['wall_s']} | {r['cpu_s']} | {r['q_per_wall_s']} | {r['q_per_cpu_s']} |" for r in rows]
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_sweep.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
    (out / "eval_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

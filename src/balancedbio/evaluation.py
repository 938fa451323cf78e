"""Benchmark evaluation through the lm-eval harness (section 5.3, Table 1).

The task definitions are YAMLs shipped in ``balancedbio/eval_tasks`` and loaded through a
``TaskManager`` include path. Each defaults to its public hub dataset; when the benchmark's
JSONL folder exists under ``benchmarks_dir`` (``<name>/test.jsonl``, ``mmlu_med/dev.jsonl``)
the runner overrides the task's dataset with those files. A benchmark found in neither place
is *not evaluated*: its result file says so, with the reason, and the workflow carries on.

Scoring: multiple choice by the log-likelihood of each option letter after the chat-templated
prompt (0-shot by default, k-shot from the dev/train split where one exists), or, with
``mode: cot``, a generated chain of thought whose answer is parsed by the same extractor as
the accuracy reward. IFEval uses lm-eval's own four metrics.

``limit`` picks a deterministic subset: a seeded sample of document indices per task (per
MMLU subject), the same for every model so their scores are paired.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balancedbio.io import write_json, write_jsonl
from balancedbio.report.stats import wilson_interval  # one home for the intervals

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).parent / "eval_tasks"
MMLU_SUBJECTS = ("anatomy", "clinical_knowledge", "professional_medicine", "medical_genetics",
                 "college_medicine", "college_biology")


@dataclass(frozen=True)
class Benchmark:
    name: str
    tasks: tuple[str, ...]
    test_file: str | None  # relative to benchmarks_dir
    dev_file: str | None
    hub: str | None
    kind: str  # "mcq" or "ifeval" (generated answers, IFEval's four metrics: IFEval and IFBench)


BENCHMARKS = {
    "mmlu_med": Benchmark("mmlu_med", tuple(f"bb_mmlu_med_{s}" for s in MMLU_SUBJECTS), "mmlu_med/test.jsonl",
                          "mmlu_med/dev.jsonl", "cais/mmlu", "mcq"),
    "medqa": Benchmark("medqa", ("bb_medqa",), "medqa/test.jsonl", None, "GBaker/MedQA-USMLE-4-options", "mcq"),
    "cmexam": Benchmark("cmexam", ("bb_cmexam",), "cmexam/test.jsonl", None, "fzkuji/CMExam", "mcq"),
    "ifeval": Benchmark("ifeval", ("bb_ifeval",), "ifeval/test.jsonl", None, "google/IFEval", "ifeval"),
    # Out-of-distribution instruction following: constraint types the instruction reward never checks.
    "ifbench": Benchmark("ifbench", ("bb_ifbench",), "ifbench/test.jsonl", None, "allenai/IFBench_test", "ifeval"),
    "kg_mcq": Benchmark("kg_mcq", ("bb_kg_mcq",), None, None, None, "mcq"),
}
IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                  "inst_level_loose_acc")


class BenchmarkUnavailable(Exception):
    """Neither local files nor the hub: the benchmark is skipped with this reason."""


def locate(benchmark: Benchmark, benchmarks_dir: str | None, kg_test_file: str | None = None) -> dict:
    """Where the data comes from: {"kind": "local", "test": ..., "dev": ...} or {"kind": "hub", ...}."""
    if benchmark.name == "kg_mcq":
        if kg_test_file and Path(kg_test_file).is_file():
            return {"kind": "local", "test": str(Path(kg_test_file).resolve()), "dev": None}
        raise BenchmarkUnavailable(f"the held-out KG split {kg_test_file} does not exist")
    reasons = []
    if benchmarks_dir:
        test = Path(benchmarks_dir) / benchmark.test_file
        if test.is_file():
            dev = Path(benchmarks_dir) / benchmark.dev_file if benchmark.dev_file else None
            return {"kind": "local", "test": str(test.resolve()),
                    "dev": str(dev.resolve()) if dev and dev.is_file() else None}
        reasons.append(f"{test} does not exist")
    else:
        reasons.append("benchmarks_dir is not set")
    from balancedbio.models import hub_offline

    if hub_offline():
        reasons.append(f"the hub dataset {benchmark.hub} cannot be fetched: HF_HUB_OFFLINE is set")
        raise BenchmarkUnavailable("; ".join(reasons))
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(benchmark.hub, timeout=10)
    except Exception as err:  # network down, no such dataset, gated...
        reasons.append(f"the hub dataset {benchmark.hub} is unreachable ({type(err).__name__}: {str(err)[:120]})")
        raise BenchmarkUnavailable("; ".join(reasons)) from None
    return {"kind": "hub", "dataset": benchmark.hub}


def check_local_file(path: str, kind: str) -> list[dict]:
    """The rows of a local benchmark file; a bad file raises one line naming file, line and fault."""
    from balancedbio.eval_tasks.utils import normalize
    from balancedbio.io import DataFormatError, read_jsonl_rows

    rows = []
    for line_number, row in read_jsonl_rows(path):
        try:
            if kind == "mcq":
                normalize(row)
            elif not isinstance(row.get("prompt"), str) or not isinstance(row.get("instruction_id_list"), list):
                raise ValueError("an IFEval row needs a string 'prompt' and a list 'instruction_id_list'")
        except ValueError as err:
            raise DataFormatError(f"{path}:{line_number}: {err}") from None
        rows.append(row)
    return rows


def _count_local_docs(task: str, rows: list[dict]) -> int:
    """How many of a local test file's rows (already checked) belong to ``task``."""
    if task.startswith("bb_mmlu_med_"):
        subject = task[len("bb_mmlu_med_"):]
        rows = [r for r in rows if r.get("subject") == subject]
    return len(rows)


def subset_indices(n_docs: int, limit: int | None, seed: int) -> list[int] | None:
    """A seeded sample of ``limit`` document indices, kept in document order (None = all)."""
    if limit is None or limit >= n_docs:
        return None
    return sorted(random.Random(seed).sample(range(n_docs), limit))


def task_specs(benchmark: Benchmark, source: dict, settings: dict) -> list[dict]:
    """lm-eval task dicts: the shipped YAML by name plus our overrides (data files, mode, lengths)."""
    specs = []
    for task in benchmark.tasks:
        spec: dict[str, Any] = {"task": task}
        if source["kind"] == "local":
            files = {"test": source["test"]}
            if source.get("dev"):
                files["dev"] = source["dev"]
            spec.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files},
                        test_split="test")
            if not source.get("dev"):
                spec.update(fewshot_split=None, training_split=None)
        if benchmark.kind == "ifeval":
            spec["generation_kwargs"] = {"until": [], "do_sample": False, "temperature": 0.0,
                                         "max_gen_toks": settings["ifeval_max_tokens"]}
        elif settings["mode"] == "cot":
            from balancedbio.eval_tasks.utils import doc_to_text_cot, process_results_cot

            spec.update(output_type="generate_until", doc_to_text=doc_to_text_cot, doc_to_choice=None,
                        process_results=process_results_cot,
                        metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
                        generation_kwargs={"until": [], "do_sample": False, "temperature": 0.0,
                                           "max_gen_toks": settings["cot_max_tokens"]})
        specs.append(spec)
    return specs


def shipped_task_manager():
    """A TaskManager that indexes only our task folder.

    Indexing lm-eval's thousands of built-in YAMLs costs about 9 s per evaluation job, and nothing
    needs them: bb_ifeval imports lm-eval's IFEval checker as a module, not as a registered task.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


def build_tasks(task_manager, specs: list[dict]) -> list:
    """Each shipped YAML task with our overrides merged in.

    A plain dict given to lm-eval is taken as a whole new task definition, not as overrides of
    the registered one, so the merge goes through the task factory the TaskManager itself uses.
    """
    tasks = []
    for spec in specs:
        entry = task_manager._entry(spec["task"])
        if entry is None:
            raise KeyError(f"lm-eval task {spec['task']} is not among the tasks in {TASK_DIR}")
        tasks.append(task_manager._factory.build(entry, overrides=spec, registry=task_manager._index))
    return tasks


def _item_rows(task: str, samples: list[dict], kind: str) -> list[dict]:
    rows = []
    for sample in samples:
        doc = sample["doc"]
        row = {"task": task, "doc_id": sample["doc_id"], "id": doc.get("id") or doc.get("key")}
        if kind == "ifeval":
            row.update(response=sample["filtered_resps"][0] if sample["filtered_resps"] else None,
                       instruction_id_list=doc["instruction_id_list"],
                       **{m: sample.get(m) for m in IFEVAL_METRICS})
            if "checker_errors" in sample:  # IFBench: instructions its checkers could not score
                row["checker_errors"] = sample["checker_errors"]
        elif isinstance(sample["filtered_resps"][0], (list, tuple)):  # log-likelihood scoring
            logliks = [float(r[0]) for r in sample["filtered_resps"]]
            letters = list(doc["options"])
            row.update(answer=doc["answer"], predicted=letters[max(range(len(logliks)), key=logliks.__getitem__)],
                       logliks=dict(zip(letters, logliks)), correct=bool(sample["acc"]))
        else:  # chain of thought
            row.update(answer=doc["answer"], response=sample["filtered_resps"][0], correct=bool(sample["acc"]))
        rows.append(row)
    return rows


def resolve_dtype(name: str, device: str | None = None) -> str:
    """``auto`` = bfloat16 where the job's device multiplies bf16 faster (``rollout.faster_dtype``)."""
    if name != "auto":
        return name
    import torch

    from balancedbio.devices import job_device
    from balancedbio.rollout import faster_dtype

    return "bfloat16" if faster_dtype(device or job_device()) == torch.bfloat16 else "float32"


def language_model(model_dir: str, settings: dict, trust_remote_code: bool = False, device: str | None = None):
    """lm-eval's model wrapper: ``hf`` (transformers, any device) or ``vllm`` (CUDA, the gpu extra).

    ``device``: the job's (``devices.job_device``). lm-eval's HF backend runs where the model
    instance it is handed lives, so the model is moved there first.
    """
    from balancedbio.devices import job_device

    device = device or job_device()
    backend = settings.get("backend", "hf")
    if backend == "vllm":
        try:
            from lm_eval.models.vllm_causallms import VLLM
        except ImportError as err:  # vllm is in the `gpu` extra and needs CUDA
            raise RuntimeError(f"eval.backend: vllm needs the vllm package (pip install -e '.[gpu]'): {err}") from None
        return VLLM(pretrained=model_dir, dtype=resolve_dtype(settings["dtype"], "cuda"), batch_size="auto",
                    max_length=settings["max_length"], trust_remote_code=trust_remote_code,
                    gpu_memory_utilization=settings.get("vllm_gpu_memory_utilization", 0.8))
    if backend != "hf":
        raise ValueError(f"unknown eval.backend {backend!r}: expected hf or vllm")
    from lm_eval.models.huggingface import HFLM

    from balancedbio.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model = load_causal_lm(model_dir, dtype=resolve_dtype(settings["dtype"], device), trust_remote_code=trust_remote_code)
    model.to(device).eval()  # weights loaded as safetensors by our loader, then handed to lm-eval
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings["batch_size"],
                max_length=settings["max_length"], trust_remote_code=trust_remote_code)


def evaluate_benchmark(*, model_dir: str, model_name: str, benchmark_name: str, benchmarks_dir: str | None,
                       settings: dict, out_json: str, out_items: str, kg_test_file: str | None = None,
                       seed: int = 0, trust_remote_code: bool = False, device: str | None = None) -> dict:
    benchmark = BENCHMARKS[benchmark_name]
    started = time.perf_counter()
    try:
        source = locate(benchmark, benchmarks_dir, kg_test_file)
    except BenchmarkUnavailable as err:
        log.warning("%s not evaluated: %s", benchmark_name, err)
        result = {"benchmark": benchmark_name, "model": model_name, "status": "skipped", "reason": str(err)}
        write_json(out_json, result)
        write_jsonl(out_items, [])
        return result

    if source["kind"] == "local":  # a bad file fails here, naming its line, not deep inside lm-eval
        local_rows = {path: check_local_file(path, benchmark.kind)
                      for path in filter(None, (source["test"], source.get("dev")))}

    import lm_eval

    from balancedbio.nltk_data import ensure_punkt_tab

    ensure_punkt_tab()
    if benchmark.kind == "ifeval" and settings.get("generation_batch_size"):
        settings = {**settings, "batch_size": settings["generation_batch_size"]}
    lm = language_model(model_dir, settings, trust_remote_code, device)
    specs = task_specs(benchmark, source, settings)
    limit = (settings.get("limit") or {}).get(benchmark_name)
    samples = None
    if source["kind"] == "local" and limit is not None:
        samples = {}
        for task in benchmark.tasks:
            indices = subset_indices(_count_local_docs(task, local_rows[source["test"]]), limit, seed)
            if indices is not None:
                samples[task] = indices
        samples = samples or None
    shots = (settings.get("num_fewshot") or {}).get(benchmark_name, 0)
    if shots and source["kind"] == "local" and not source.get("dev"):
        log.warning("%s: no dev split next to %s, so 0-shot instead of %d-shot", benchmark_name, source["test"],
                    shots)
        shots = 0
    task_manager = shipped_task_manager()
    output = lm_eval.simple_evaluate(
        model=lm, tasks=build_tasks(task_manager, specs), task_manager=task_manager,
        num_fewshot=shots, samples=samples, limit=None if samples is not None or source["kind"] == "local"
        else limit, apply_chat_template=settings["apply_chat_template"], fewshot_as_multiturn=bool(shots),
        log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=0)

    per_task, items = {}, []
    for task in benchmark.tasks:
        metrics = output["results"][task]
        n = int(output["n-samples"][task]["effective"])
        names = IFEVAL_METRICS if benchmark.kind == "ifeval" else ("acc",)
        per_task[task] = {"n": n, **{m: float(metrics[f"{m},none"]) for m in names}}
        items.extend(_item_rows(task, output["samples"][task], benchmark.kind))

    n_total = sum(t["n"] for t in per_task.values())
    if benchmark.kind == "ifeval":
        task = per_task[benchmark.tasks[0]]
        n_instructions = sum(len(i["instruction_id_list"]) for i in items)
        metrics = {m: {"value": task[m], "ci95": wilson_interval(task[m], n_instructions if m.startswith("inst") else n_total)}
                   for m in IFEVAL_METRICS}
        metrics["n_instructions"] = n_instructions
        if benchmark_name == "ifbench":
            metrics["checker_errors"] = sum(len(i.get("checker_errors") or []) for i in items)
            if metrics["checker_errors"]:
                log.warning("ifbench: %d instructions could not be scored (counted as not followed): %s",
                            metrics["checker_errors"], sorted({e.split(":")[0] + ":" + e.split(":")[1]
                                                              for i in items for e in i.get("checker_errors") or []}))
    else:  # micro-average over questions (MMLU: over the six subjects)
        correct = sum(1 for i in items if i["correct"])
        acc = correct / n_total if n_total else math.nan
        metrics = {"acc": {"value": acc, "ci95": wilson_interval(acc, n_total)}}
    result = {
        "benchmark": benchmark_name, "model": model_name, "status": "ok", "n": n_total, "metrics": metrics,
        "per_subject": ({t.replace("bb_mmlu_med_", ""): {"n": v["n"], "acc": v["acc"], "ci95": wilson_interval(v["acc"], v["n"])}
                         for t, v in per_task.items()} if benchmark_name == "mmlu_med" else None),
        "source": source, "num_fewshot": shots, "mode": "ifeval" if benchmark.kind == "ifeval" else settings["mode"],
        "limit": limit, "seconds": round(time.perf_counter() - started, 1),
        "questions_per_second": round(n_total / max(time.perf_counter() - started, 1e-9), 3),
        "settings": settings, "dtype_used": str(next(lm.model.parameters()).dtype).replace("torch.", "")
        if hasattr(lm, "model") and hasattr(lm.model, "parameters") else resolve_dtype(settings["dtype"]),
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
    }
    write_jsonl(out_items, items)
    write_json(out_json, result)
    log.info("%s on %s: %s (n=%d, %.0f s)", model_name, benchmark_name,
             {k: round(v["value"], 4) for k, v in metrics.items() if isinstance(v, dict)}, n_total,
             result["seconds"])
    return result


def collect_skipped(result_files: list[str], out_path: str) -> list[dict]:
    skipped = []
    for path in result_files:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        if result.get("status") == "skipped":
            skipped.append({"model": result["model"], "benchmark": result["benchmark"], "reason": result["reason"]})
    write_json(out_path, skipped)
    return skipped


"""Entry points of the data-preparation rules (the workflow scripts call these)."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from balancedbio.io import read_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)


def build_kg(out_path: str | Path) -> dict:
    from balancedbio.data.kg import build_graph

    start = time.perf_counter()
    kg = build_graph()
    kg.save(out_path)
    summary = kg.summary()
    log.info("Knowledge graph: %s (%.1f s)", summary, time.perf_counter() - start)
    return summary


def kg_synth(graph_path: str | Path, *, kg_config: dict, sft_config: dict, seed: int, outputs: dict) -> dict:
    """Questions (train/val/test), reasoning chains with step labels, SFT conversations, statistics.

    Train questions are split three ways by ``use`` (see ``balancedbio.data.mcq.USES``):
    mcq_train.jsonl holds them all, each with its ``use``; steps.jsonl holds the labelled
    chains of the PRM's questions only (plus val/test chains for evaluation); sft.jsonl the
    SFT questions' sound chains; the GRPO prompts are the ``use: grpo`` rows of mcq_train
    (``decontaminate`` keeps only those in clean/mcq_train.jsonl).
    """
    from balancedbio.data.instruct import generate_sft_instruct
    from balancedbio.data.kg import KnowledgeGraph
    from balancedbio.data.mcq import QUESTION_KINDS, generate_questions
    from balancedbio.data.reasoning import build_step_rows, label_counts, sft_conversation

    start = time.perf_counter()
    kg = KnowledgeGraph.load(graph_path)
    kinds = kg_config.get("kinds") or {name: 1.0 for name in QUESTION_KINDS}
    questions, stats = generate_questions(
        kg, num_questions=kg_config["num_questions"], kinds=kinds, seed=seed,
        val_fraction=kg_config["val_fraction"], test_fraction=kg_config["test_fraction"],
        use_fractions=kg_config["use_fractions"])
    by_split = {s: [q for q in questions if q["split"] == s] for s in ("train", "val", "test")}
    for split, rows in by_split.items():
        write_jsonl(outputs[f"mcq_{split}"], rows)

    chains = build_step_rows(kg, questions, seed, kg_config["flawed_chains_per_question"])
    steps = [c for c in chains if c["split"] != "train" or c["use"] == "prm"]
    write_jsonl(outputs["steps"], steps)
    stats["step_labels"] = {s: label_counts([c for c in steps if c["split"] == s]) for s in by_split}

    medical = [sft_conversation(c) for c in chains if c["split"] == "train" and c["use"] == "sft"
               and c["chain"] == "sound"]
    fraction = sft_config["instruct_fraction"]
    n_instruct = round(len(medical) * fraction / (1 - fraction)) if fraction < 1 else len(medical)
    # Instruction conversations talk about the SFT questions' diseases only (no other use's family).
    train_diseases = sorted({d for q in by_split["train"] if q.get("use") == "sft" for d in q["entities"]["diseases"]})
    instruct, instruct_stats = generate_sft_instruct(
        kg, train_diseases, num_conversations=n_instruct, seed=seed,
        min_instructions=sft_config["min_instructions"], max_instructions=sft_config["max_instructions"])
    conversations = medical + instruct
    random.Random(f"{seed}:sft-mix").shuffle(conversations)
    write_jsonl(outputs["sft"], conversations)
    stats["sft"] = {"medical": len(medical), "instruction": len(instruct), **{f"instruct_{k}": v
                                                                             for k, v in instruct_stats.items()}}
    stats["graph"] = kg.summary()
    stats["graph_meta"] = kg.meta
    stats["seconds"] = round(time.perf_counter() - start, 2)
    write_json(outputs["stats"], stats)
    log.info("kg_synth: %d questions (train %d / val %d / test %d), %d chains, %d SFT conversations in %.1f s",
             len(questions), *(len(by_split[s]) for s in ("train", "val", "test")), len(steps),
             len(conversations), stats["seconds"])
    return stats


def instruction_test_prompts(benchmarks_dir: str | Path | None) -> set[str]:
    """The IFEval and IFBench test prompts present under ``benchmarks_dir``: no generated prompt may equal one."""
    prompts: set[str] = set()
    for name in ("ifeval", "ifbench"):
        path = Path(benchmarks_dir) / name / "test.jsonl" if benchmarks_dir else None
        if path and path.is_file():
            prompts |= {row["prompt"] for row in read_jsonl(path)}
    return prompts


def instruct_prompts(graph_path: str | Path, mcq_train_path: str | Path, *, instruct_config: dict, seed: int,
                     benchmarks_dir: str | None, out_path: str | Path) -> int:
    from balancedbio.data.instruct import generate_prompts
    from balancedbio.data.kg import KnowledgeGraph
    from balancedbio.ifeval import instruction_registry

    kg = KnowledgeGraph.load(graph_path)
    # Medical instruction prompts are GRPO prompts: only the GRPO questions' diseases.
    train_diseases = sorted({d for q in read_jsonl(mcq_train_path) if q.get("use", "grpo") == "grpo"
                             for d in q["entities"]["diseases"]})
    ids = instruct_config.get("instruction_ids") or sorted(
        i for i in instruction_registry() if i != "language:response_language")
    unknown = sorted(set(ids) - set(instruction_registry()))
    if unknown:
        raise ValueError(f"instruct.instruction_ids: {unknown} are not IFEval instruction ids")
    rows = generate_prompts(kg, train_diseases, num_prompts=instruct_config["num_prompts"],
                            medical_fraction=instruct_config["medical_fraction"], instruction_ids=ids,
                            min_instructions=instruct_config["min_instructions"],
                            max_instructions=instruct_config["max_instructions"], seed=seed,
                            forbidden_prompts=instruction_test_prompts(benchmarks_dir))
    if len(rows) < instruct_config["num_prompts"]:
        log.warning("instruct_prompts: only %d distinct prompts of %d requested", len(rows), instruct_config["num_prompts"])
    return write_jsonl(out_path, rows)


def ingest_dataset(spec: dict, out_path: str | Path, status_path: str | Path) -> dict:
    from balancedbio.data.ingest import DatasetUnavailable, ingest

    try:
        rows, status = ingest(spec)
    except DatasetUnavailable as err:
        if spec.get("required"):
            raise
        log.warning("%s -- skipped; the workflow goes on without it (set required: true to fail instead).", err)
        rows, status = [], {"name": spec["name"], "source": spec["source"], "schema": spec["schema"],
                            "status": "unavailable", "reason": str(err), "rows": 0}
    write_jsonl(out_path, rows)
    write_json(status_path, status)
    log.info("ingest %s: %s, %d rows", spec["name"], status["status"], status["rows"])
    return status


def decontaminate(*, sources: dict[str, str], external: list[tuple[str, str, str]], kg_test_path: str,
                  benchmarks_dir: str | None, benchmarks: list[str], ngram: int, threshold: float,
                  outputs: dict[str, str], report_path: str) -> dict:
    """Write the clean training files and the decontamination report.

    ``sources`` maps an output name (mcq_train, mcq_val, steps, sft, prompts) to its input file;
    ``external`` lists (name, schema, rows_path, status_path) of ingested datasets.
    """
    from balancedbio.data.decontam import BenchmarkIndex, decontaminate as drop_overlaps, load_benchmark_texts
    from balancedbio.io import read_jsonl as rows_of

    start = time.perf_counter()
    index = BenchmarkIndex(ngram)
    texts = load_benchmark_texts(benchmarks_dir, benchmarks)
    for name, items in texts.items():
        index.add(name, items)
    index.add("kg_mcq", [q["question"] for q in rows_of(kg_test_path)])
    missing = sorted(set(benchmarks) - set(texts))
    if missing:
        log.warning("decontaminate: no test set found for %s under %s; not checked against them", missing, benchmarks_dir)

    schema_target = {"mcq": "mcq_train", "steps": "steps", "sft": "sft", "instruct": "prompts"}
    merged = {name: list(rows_of(path)) for name, path in sources.items()}
    external_status = []
    for name, schema, rows_path, status_path in external:
        merged[schema_target[schema]].extend(rows_of(rows_path))
        status = json.loads(Path(status_path).read_text(encoding="utf-8"))
        external_status.append({**status, "merged_into": schema_target[schema]})
    report = {"ngram": ngram, "threshold": threshold, "benchmarks_checked": dict(index.sizes),
              "benchmarks_missing": missing, "benchmarks_dir": benchmarks_dir, "outputs": {},
              "external": external_status}
    # clean/mcq_train.jsonl is the GRPO prompt set: KG questions whose `use` is the PRM or SFT
    # stay out of it (ingested MCQ rows have no `use` and are GRPO prompts).
    reserved = {"mcq_train": sum(r.get("use", "grpo") != "grpo" for r in merged["mcq_train"])}
    merged["mcq_train"] = [r for r in merged["mcq_train"] if r.get("use", "grpo") == "grpo"]
    for name, rows in merged.items():
        # Chains of kg_mcq's own test questions are held-out PRM evaluation data, not training
        # data: they may share text with kg_mcq's test split, but not with the other benchmarks.
        held_out = [r for r in rows if name == "steps" and r.get("split") == "test"]
        training = [r for r in rows if not (name == "steps" and r.get("split") == "test")]
        kept, counts = drop_overlaps(training, index, threshold)
        kept_held_out, held_out_counts = drop_overlaps(held_out, index, threshold, exempt={"kg_mcq"})
        counts = _merge_counts(counts, held_out_counts)
        write_jsonl(outputs[name], kept + kept_held_out)
        counts["per_source"] = _per_source(rows, kept + kept_held_out)
        if name in reserved:
            counts["reserved_for_prm_or_sft"] = reserved[name]
        report["outputs"][name] = counts
        log.info("decontaminate %s: kept %d of %d (dropped %s)", name, counts["kept"], counts["total"],
                 counts["dropped_by_benchmark"] or 0)
    report["seconds"] = round(time.perf_counter() - start, 2)
    write_json(report_path, report)
    return report


def _merge_counts(a: dict, b: dict) -> dict:
    by_benchmark = {k: a["dropped_by_benchmark"].get(k, 0) + b["dropped_by_benchmark"].get(k, 0)
                    for k in sorted(set(a["dropped_by_benchmark"]) | set(b["dropped_by_benchmark"]))}
    return {"total": a["total"] + b["total"], "kept": a["kept"] + b["kept"], "dropped": a["dropped"] + b["dropped"],
            "dropped_by_benchmark": by_benchmark, "dropped_examples": (a["dropped_examples"] + b["dropped_examples"])[:10]}


def _per_source(rows: list[dict], kept: list[dict]) -> dict:
    def source(r):
        return r.get("source") or "kg"

    totals: dict[str, dict] = {}
    for r in rows:
        totals.setdefault(source(r), {"total": 0, "kept": 0})["total"] += 1
    for r in kept:
        totals[source(r)]["kept"] += 1
    for v in totals.values():
        v["dropped"] = v["total"] - v["kept"]
    return totals

"""Data preparation: MKGSG questions, ontology validation, splits, step labels, instruction
prompts, SFT conversations, ingest and decontamination -- on the outputs of a real smoke run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

from balancedbio.data.decontam import BenchmarkIndex, decontaminate, load_benchmark_texts
from balancedbio.data.ingest import IngestError, ingest
from balancedbio.data.kg import series_name
from balancedbio.data.mcq import QUESTION_KINDS, USES, candidate_from_row, generate_questions, validate
from balancedbio.data.reasoning import FALLACIOUS, LABELS, NEUTRAL, VALID
from balancedbio.io import read_jsonl

from conftest import SHARED_BENCHMARKS, SMOKE_ENV, TEST_CONFIG, run_snakemake

pytestmark = pytest.mark.slow


def _rows(workdir, name):
    return list(read_jsonl(workdir / "results" / "data" / name))


@pytest.fixture(scope="module")
def questions(smoke_workdir):
    return {s: _rows(smoke_workdir, f"kg/mcq_{s}.jsonl") for s in ("train", "val", "test")}


def test_questions_have_the_promised_shape(questions):
    rows = [r for split in questions.values() for r in split]
    assert len(rows) >= 40
    assert len({r["kind"] for r in rows}) >= 5
    for row in rows:
        assert set(row["options"]) == {"A", "B", "C", "D"}
        assert row["options"][row["answer"]] == row["answer_text"]
        assert len(set(row["options"].values())) == 4
        assert row["provenance"] and row["id"].startswith(f"kg-{row['split']}-")
        assert set(row["entities"]) == {"diseases", "genes", "icd10cm"}
        # Train questions are split three ways (PRM / SFT / GRPO); held-out ones have no use.
        assert row.get("use") in (USES if row["split"] == "train" else (None,)), row["id"]
    assert len({r["answer"] for r in rows}) == 4, "answer positions must be shuffled"
    assert len({(r["kind"], r["template"]) for r in rows}) > len({r["kind"] for r in rows}), "several phrasings"


def test_every_generated_question_passes_validation_again(questions, smoke_graph):
    for row in (r for split in questions.values() for r in split):
        assert validate(smoke_graph, candidate_from_row(row)) is None, row["id"]


def _first(questions, kind):
    return next(r for split in questions.values() for r in split if r["kind"] == kind)


def test_validation_rejects_a_planted_correct_distractor(questions, smoke_graph):
    kg = smoke_graph
    row = _first(questions, "phenotype_of_disease")
    cand = candidate_from_row(row)
    other_feature = next(t for t in kg.diseases[cand.subject].phenotypes
                         if kg.is_phenotype(t) and not kg.terms_related(t, cand.key)
                         and not any(kg.terms_related(t, d) for d in cand.distractors[1:]))
    planted = dataclasses.replace(cand, distractors=[other_feature, *cand.distractors[1:]])
    assert validate(kg, planted) == "ambiguous_more_than_one_answer"


def test_validation_rejects_ambiguous_gene_question(smoke_graph):
    kg = smoke_graph
    disease = next(d for d, v in sorted(kg.diseases.items()) if len(v.genes) >= 2)
    first, second = kg.diseases[disease].genes[:2]
    unrelated = [g for g in sorted(kg.genes) if not kg.gene_causes(g, disease)][:2]
    cand = candidate_from_row({"kind": "gene_of_disease", "subject": disease, "answer": "A",
                               "option_ids": {"A": first, "B": second, "C": unrelated[0], "D": unrelated[1]}})
    assert validate(kg, cand) == "ambiguous_more_than_one_answer"


def test_validation_rejects_ancestor_wrong_type_and_unsupported_key(questions, smoke_graph):
    kg = smoke_graph
    cand = candidate_from_row(_first(questions, "phenotype_of_disease"))
    parent = kg.terms[cand.key].parents[0]
    ancestor = dataclasses.replace(cand, distractors=[parent, *cand.distractors[1:]])
    assert validate(kg, ancestor) in {"options_related_in_ontology", "ambiguous_more_than_one_answer"}
    gene = sorted(kg.genes)[0]
    assert validate(kg, dataclasses.replace(cand, distractors=[gene, *cand.distractors[1:]])) == \
        "distractor_type_mismatch"
    swapped = dataclasses.replace(cand, key=cand.distractors[0], distractors=[cand.key, *cand.distractors[1:]])
    assert validate(kg, swapped) == "key_not_supported"


def test_no_entity_crosses_the_split(questions, smoke_workdir, smoke_graph):
    kg = smoke_graph
    for field in ("diseases", "genes", "icd10cm"):
        by_split = {s: {e for r in rows for e in r["entities"][field]} for s, rows in questions.items()}
        assert not by_split["train"] & by_split["test"], field
        assert not by_split["train"] & by_split["val"], field
        assert not by_split["val"] & by_split["test"], field
    families = {s: {series_name(kg.name(d)) for r in rows for d in r["entities"]["diseases"]}
                for s, rows in questions.items()}
    assert not families["train"] & families["test"], "numbered subtypes of one disease family must not cross"
    split_of = {r["id"]: s for s, rows in questions.items() for r in rows}
    for chain in _rows(smoke_workdir, "kg/steps.jsonl"):
        assert chain["split"] == split_of[chain["question_id"]]


def test_step_labels_are_what_they_claim(smoke_workdir, smoke_graph):
    chains = _rows(smoke_workdir, "kg/steps.jsonl")
    counts = {label: 0 for label in LABELS}
    for chain in chains:
        for step in chain["steps"]:
            counts[step["label"]] += 1
            fact = step["fact"]
            if fact is None:
                assert step["label"] == NEUTRAL  # a restatement of the question
            elif fact["relation"] == "conclusion":
                assert (fact["object"] == chain["answer"]) == (step["label"] == VALID)
            elif step["label"] == FALLACIOUS:
                assert not smoke_graph.fact_holds(fact), step["text"]
            else:
                assert smoke_graph.fact_holds(fact), step["text"]
    total = sum(counts.values())
    assert all(count / total > 0.2 for count in counts.values()), counts
    assert {c["chain"] for c in chains} == {"sound", "flawed"}


def test_sft_conversations_end_with_the_answer_line(smoke_workdir, questions):
    answers = {r["id"]: r["answer"] for r in questions["train"]}
    conversations = _rows(smoke_workdir, "sft.jsonl")
    medical = [c for c in conversations if c["capability"] == "medical"]
    assert medical and any(c["capability"] == "instruction" for c in conversations)
    for conv in medical:
        assistant = conv["messages"][-1]["content"]
        assert assistant.startswith("Step 1: ")
        assert assistant.splitlines()[-1] == f"Answer: {answers[conv['id'].removeprefix('sft-')]}"


def test_instruction_conversations_satisfy_their_constraints(smoke_workdir):
    from balancedbio.ifeval import follows

    conversations = [c for c in _rows(smoke_workdir, "sft.jsonl") if c["capability"] == "instruction"]
    for conv in conversations:
        prompt, response = conv["messages"][0]["content"], conv["messages"][1]["content"]
        assert all(follows(prompt, conv["instruction_id_list"], conv["kwargs"], response)), conv["id"]


def test_every_instruct_prompt_is_checkable_by_the_verifier(smoke_workdir):
    from balancedbio.data.instruct import build_prompt
    from balancedbio.ifeval import follows, instruction_registry

    prompts = _rows(smoke_workdir, "instruct/prompts.jsonl")
    assert len(prompts) >= 20
    assert {p["topic_kind"] for p in prompts} == {"medical", "general"}
    for row in prompts:
        assert row["instruction_id_list"] and set(row["instruction_id_list"]) <= set(instruction_registry())
        assert build_prompt(row["task"], row["instruction_id_list"], row["kwargs"]) == row["prompt"]
        verdicts = follows(row["prompt"], row["instruction_id_list"], row["kwargs"], "A plain answer.")
        assert len(verdicts) == len(row["instruction_id_list"]) and all(isinstance(v, bool) for v in verdicts)


def test_no_instruct_prompt_is_an_ifeval_test_prompt(smoke_workdir):
    ifeval = {r["prompt"].strip().lower() for r in read_jsonl(SHARED_BENCHMARKS / "ifeval" / "test.jsonl")}
    prompts = _rows(smoke_workdir, "instruct/prompts.jsonl")
    assert not {p["prompt"].strip().lower() for p in prompts} & ifeval


def test_sentence_checks_work_offline(tmp_path):
    from balancedbio.nltk_data import ensure_punkt_tab

    import nltk

    ensure_punkt_tab(tmp_path)
    assert (tmp_path / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").stat().st_size > 100_000
    tokenizer = nltk.tokenize.PunktTokenizer("english")
    assert len(tokenizer.tokenize("Dr. Smith saw the patient at 3 p.m. on Monday. She was better.")) == 2


def test_same_seed_same_questions_other_seed_other_questions(smoke_graph):
    kwargs = dict(num_questions=24, kinds={k: 1 for k in QUESTION_KINDS}, val_fraction=0.1, test_fraction=0.1,
                  progress=False)
    first, _ = generate_questions(smoke_graph, seed=7, **kwargs)
    second, _ = generate_questions(smoke_graph, seed=7, **kwargs)
    other, _ = generate_questions(smoke_graph, seed=8, **kwargs)
    assert json.dumps(first) == json.dumps(second)
    assert json.dumps(first) != json.dumps(other)


def test_rerunning_kg_synth_reproduces_the_same_bytes(smoke_workdir, tmp_path):
    from balancedbio.config import load_config
    from balancedbio.data.pipeline import kg_synth

    config = load_config(TEST_CONFIG)
    names = {"mcq_train": "kg/mcq_train.jsonl", "mcq_val": "kg/mcq_val.jsonl", "mcq_test": "kg/mcq_test.jsonl",
             "steps": "kg/steps.jsonl", "sft": "sft.jsonl", "stats": "kg/stats.json"}
    outputs = {key: str(tmp_path / path.replace("/", "_")) for key, path in names.items()}
    kg_synth(smoke_workdir / "results" / "data" / "kg" / "graph.json.gz", kg_config=config["kg"],
             sft_config=config["sft_data"], seed=config["seed"], outputs=outputs)
    for key, path in names.items():
        if key == "stats":
            continue  # holds the run time
        again = hashlib.sha256(open(outputs[key], "rb").read()).hexdigest()
        original = hashlib.sha256((smoke_workdir / "results" / "data" / path).read_bytes()).hexdigest()
        assert again == original, path


def test_decontamination_catches_planted_benchmark_questions(smoke_workdir):
    texts = load_benchmark_texts(SHARED_BENCHMARKS, ["medqa", "cmexam", "ifeval", "ifbench", "mmlu_med"])
    index = BenchmarkIndex(13)
    for name, items in texts.items():
        index.add(name, items)
    train = _rows(smoke_workdir, "kg/mcq_train.jsonl")
    medqa_question = texts["medqa"][3]
    cmexam_question = next(q for q in texts["cmexam"] if len(q) > 40)
    planted = [
        {**train[0], "id": "planted-medqa", "question": medqa_question},
        {**train[1], "id": "planted-cmexam", "question": f"请回答：{cmexam_question}"},
        {"id": "planted-sft", "messages": [{"role": "user", "content": "Please help. " + medqa_question[20:]},
                                           {"role": "assistant", "content": "Answer: A"}]},
        # An instruction prompt that quotes an IFBench test prompt (IFBench is the out-of-distribution test).
        {"id": "planted-ifbench", "prompt": "Answer this: " + next(p for p in texts["ifbench"] if len(p) > 120),
         "instruction_id_list": [], "kwargs": []},
    ]
    kept, report = decontaminate(train + planted, index, threshold=0.0)
    kept_ids = {r["id"] for r in kept}
    assert not {"planted-medqa", "planted-cmexam", "planted-sft", "planted-ifbench"} & kept_ids
    assert {r["id"] for r in train} <= kept_ids
    assert report["dropped_by_benchmark"] == {"medqa": 2, "cmexam": 1, "ifbench": 1}


def test_decontamination_report_of_the_run(smoke_workdir):
    report = json.loads((smoke_workdir / "results" / "data" / "decontamination.json").read_text())
    assert report["benchmarks_checked"]["medqa"] == 1018
    assert report["benchmarks_checked"]["kg_mcq"] >= 1
    assert set(report["outputs"]) == {"mcq_train", "mcq_val", "steps", "sft", "prompts"}
    for name, counts in report["outputs"].items():
        assert counts["kept"] == len(_rows(smoke_workdir, f"clean/{name}.jsonl"))


def test_ingest_local_jsonl_skips_and_counts_malformed_rows(tmp_path):
    path = tmp_path / "medqa_like.jsonl"
    rows = [
        {"q": "Which vitamin deficiency causes scurvy?", "opts": ["A", "C", "D", "K"], "ans": 1},
        {"q": "Which organ makes insulin?", "opts": {"A": "Liver", "B": "Pancreas"}, "ans": "B"},
        {"q": "Broken answer", "opts": ["x", "y"], "ans": "Z"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    spec = {"name": "toy", "source": str(path), "schema": "mcq",
            "fields": {"question": "q", "options": "opts", "answer": "ans"}}
    out, status = ingest(spec)
    assert [r["answer"] for r in out] == ["B", "B"]
    assert out[0]["options"] == {"A": "A", "B": "C", "C": "D", "D": "K"}
    assert status["malformed_rows"] == 2
    assert status["malformed_examples"][0].startswith(f"{path}:3: answer 'Z'")
    assert status["malformed_examples"][1].startswith(f"{path}:4: not valid JSON")


def test_ingest_all_bad_rows_fails_naming_the_dataset(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": ""}\n{"prompt": "   "}\n')
    with pytest.raises(IngestError, match=r"dataset 'broken': all 2 rows are malformed; first: .*bad.jsonl:1"):
        ingest({"name": "broken", "source": str(path), "schema": "instruct"})


def test_ingest_unreachable_dataset_is_skipped_unless_required(tmp_path):
    # A fresh interpreter, as users run it: the hub libraries read the offline switch at import.
    script = f"""
import json, sys
from balancedbio.data.ingest import DatasetUnavailable
from balancedbio.data.pipeline import ingest_dataset
spec = {{"name": "ultrachat", "source": "balancedbio-tests/no-such-dataset", "schema": "instruct"}}
status = ingest_dataset(spec, {str(tmp_path / "u.jsonl")!r}, {str(tmp_path / "u.status.json")!r})
try:
    ingest_dataset({{**spec, "required": True}}, {str(tmp_path / "r.jsonl")!r}, {str(tmp_path / "r.status.json")!r})
    required = "no error"
except DatasetUnavailable as err:
    required = str(err)
print(json.dumps({{"status": status, "required": required}}))
"""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["status"]["status"] == "unavailable" and "dataset 'ultrachat'" in outcome["status"]["reason"]
    assert "dataset 'ultrachat'" in outcome["required"]
    assert (tmp_path / "u.jsonl").read_text() == ""
    assert not (tmp_path / "r.jsonl").exists(), "nothing is written when the rule fails"


def test_ingested_steps_map_labels(tmp_path):
    path = tmp_path / "prm.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "steps": ["2+2=4", "so 5"], "labels": [1, -1]}) + "\n")
    rows, _ = ingest({"name": "prm", "source": str(path), "schema": "steps",
                      "label_map": {"1": "valid", "0": "neutral", "-1": "fallacious"}})
    assert [s["label"] for s in rows[0]["steps"]] == ["valid", "fallacious"]


def test_dry_run_plans_ingest_jobs_for_declared_datasets(tmp_path):
    extra = tmp_path / "ingest.yaml"
    extra.write_text("ingest:\n  - {name: toy, source: ./toy.jsonl, schema: mcq}\n")
    result = run_snakemake("-n", "--configfile", str(TEST_CONFIG), str(extra),
                           workdir=tmp_path, env=SMOKE_ENV)
    plan = result.stdout + result.stderr
    assert "rule ingest:" in plan and "results/data/external/toy.jsonl" in plan


def test_rng_helpers_do_not_touch_global_random_state(smoke_graph):
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_questions(smoke_graph, num_questions=8, kinds={"inheritance_mode": 1}, seed=1,
                       val_fraction=0.1, test_fraction=0.1, progress=False)
    assert random.random() == expected

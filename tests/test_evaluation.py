"""Benchmark evaluation through lm-eval: task loading, subsets, scoring, skips, IFEval metrics."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_BENCHMARKS

from balancedbio.evaluation import (BENCHMARKS, MMLU_SUBJECTS, build_tasks, evaluate_benchmark, locate,
                                    subset_indices, task_specs)

needs_benchmarks = pytest.mark.skipif(not (SHARED_BENCHMARKS / "mmlu_med" / "test.jsonl").is_file(),
                                      reason=f"benchmark files not found under {SHARED_BENCHMARKS}")
SETTINGS = {"batch_size": 4, "max_length": 2048, "dtype": "float32", "apply_chat_template": True,
            "mode": "loglikelihood", "ifeval_max_tokens": 16, "cot_max_tokens": 16, "limit": {}, "num_fewshot": {}}


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _task_manager():
    from balancedbio.evaluation import shipped_task_manager

    return shipped_task_manager()


@needs_benchmarks
@pytest.mark.parametrize("name", ["mmlu_med", "medqa", "cmexam", "ifeval", "ifbench"])
def test_each_task_loads_the_local_files_with_the_right_row_count(name):
    benchmark = BENCHMARKS[name]
    source = locate(benchmark, str(SHARED_BENCHMARKS))
    assert source["kind"] == "local"
    tasks = build_tasks(_task_manager(), task_specs(benchmark, source, SETTINGS))
    rows = _lines(SHARED_BENCHMARKS / benchmark.test_file)
    counts = {task.config.task: len(list(task.eval_docs)) for task in tasks}
    if name == "mmlu_med":
        assert counts == {f"bb_mmlu_med_{s}": sum(r["subject"] == s for r in rows) for s in MMLU_SUBJECTS}
        anatomy = next(t for t in tasks if t.config.task == "bb_mmlu_med_anatomy")
        assert len(list(anatomy.fewshot_docs())) == 5  # the dev split, one subject's share
    else:
        assert list(counts.values()) == [len(rows)]
    if benchmark.kind == "mcq":
        doc = next(iter(tasks[0].eval_docs))
        assert set(doc["options"]) <= set("ABCDE") and doc["answer"] in doc["options"]
        assert tasks[0].doc_to_text(doc).endswith("\nAnswer:")
        assert tasks[0].doc_to_choice(doc)[tasks[0].doc_to_target(doc)] == doc["answer"]


def test_kg_mcq_reads_the_held_out_synthetic_split(tmp_path):
    test = tmp_path / "mcq_test.jsonl"
    test.write_text(json.dumps({"id": "kg-1", "question": "Which gene?", "options": {"A": "X", "B": "Y", "C": "Z",
                                                                                    "D": "W"}, "answer": "C"}) + "\n")
    source = locate(BENCHMARKS["kg_mcq"], None, str(test))
    [task] = build_tasks(_task_manager(), task_specs(BENCHMARKS["kg_mcq"], source, SETTINGS))
    [doc] = list(task.eval_docs)
    assert doc["answer"] == "C" and task.doc_to_target(doc) == 2


def test_subsets_are_seeded_sorted_and_shared_by_every_model():
    first = subset_indices(100, 10, seed=3)
    assert first == subset_indices(100, 10, seed=3) == sorted(first) and len(set(first)) == 10
    assert subset_indices(100, 10, seed=4) != first
    assert subset_indices(5, 10, seed=3) is None and subset_indices(5, None, seed=3) is None


def test_missing_benchmark_is_skipped_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "medqa.json"
    result = evaluate_benchmark(model_dir="unused", model_name="base", benchmark_name="medqa",
                                benchmarks_dir=str(tmp_path), settings=SETTINGS, out_json=str(out),
                                out_items=str(tmp_path / "medqa.items.jsonl"))
    written = json.loads(out.read_text())
    assert written == result and written["status"] == "skipped"
    assert "medqa/test.jsonl does not exist" in written["reason"]
    assert "GBaker/MedQA-USMLE-4-options" in written["reason"] and "HF_HUB_OFFLINE" in written["reason"]
    assert (tmp_path / "medqa.items.jsonl").read_text() == ""


@needs_benchmarks
def test_ifeval_metrics_match_the_verifier_on_hand_written_responses():
    from balancedbio.eval_tasks.utils import ifeval_process_results
    from balancedbio.ifeval import follows

    docs = {d["key"]: d for d in _lines(SHARED_BENCHMARKS / "ifeval" / "test.jsonl")}
    doc = docs[1000]  # no commas, 3 highlighted sections, at least 300 words
    compliant = " ".join(["*highlighted section part one* Raymond ruled Tripoli and fought at Hattin"] * 3
                         + ["word"] * 300)
    broken = "Raymond, count of Tripoli, was a regent."
    for response in (compliant, broken):
        metrics = ifeval_process_results(doc, [response])
        strict = follows(doc["prompt"], doc["instruction_id_list"], doc["kwargs"], response)
        loose = follows(doc["prompt"], doc["instruction_id_list"], doc["kwargs"], response, loose=True)
        assert metrics["inst_level_strict_acc"] == strict and metrics["prompt_level_strict_acc"] == all(strict)
        assert metrics["inst_level_loose_acc"] == loose and metrics["prompt_level_loose_acc"] == all(loose)
    assert all(ifeval_process_results(doc, [compliant])["inst_level_strict_acc"])
    assert not any(ifeval_process_results(doc, [broken])["inst_level_strict_acc"])


@needs_benchmarks
def test_ifbench_checkers_pass_and_fail_known_responses_to_named_constraints():
    """Real IFBench prompts through the bb_ifbench task's scorer (if_verifiable's checkers)."""
    from balancedbio.eval_tasks.utils import ifbench_process_results

    docs = {d["key"]: d for d in _lines(SHARED_BENCHMARKS / "ifbench" / "test.jsonl")}
    keywords = docs["0"]  # count:keywords_multiple: kaleidoscope x1, nebula x2, whisper x3, labyrinth x5, paradox x7
    assert keywords["instruction_id_list"] == ["count:keywords_multiple"]
    counted = " ".join(["kaleidoscope"] + ["nebula"] * 2 + ["whisper"] * 3 + ["labyrinth"] * 5 + ["paradox"] * 7)
    passing = ifbench_process_results(keywords, [f"A {counted} walks into a bar."])
    failing = ifbench_process_results(keywords, [f"A {counted} paradox walks into a bar."])  # paradox x8
    assert passing["prompt_level_strict_acc"] and passing["inst_level_strict_acc"] == [True]
    assert not failing["prompt_level_strict_acc"] and failing["inst_level_strict_acc"] == [False]

    no_space = docs["297"]  # format:no_whitespace
    assert no_space["instruction_id_list"] == ["format:no_whitespace"]
    assert ifbench_process_results(no_space, ["Particlesabove10ppmfoulbiosensors."])["prompt_level_strict_acc"]
    spaced = ifbench_process_results(no_space, ["Particles above 10 ppm foul biosensors."])
    assert not spaced["prompt_level_strict_acc"] and not spaced["prompt_level_loose_acc"]

    # Two constraints, one met: prompt level fails, instruction level is per constraint.
    words = docs["197"]  # sentence:keyword (iritic in the 5th sentence) + count:word_count_range 89-99
    assert words["instruction_id_list"] == ["sentence:keyword", "count:word_count_range"]
    sentences = ["Fusion research has paid off in many fields."] * 4 + ["The iritic glow of plasma guided optics."]
    filler = " ".join(["Superconducting magnets now serve hospitals worldwide."] * 10)
    both = " ".join(sentences) + " " + filler
    n_words = len(both.split())
    assert 89 <= n_words <= 99, n_words
    result = ifbench_process_results(words, [both])
    assert result["inst_level_strict_acc"] == [True, True] and result["prompt_level_strict_acc"]
    short = ifbench_process_results(words, [" ".join(sentences)])
    assert short["inst_level_strict_acc"] == [True, False] and not short["prompt_level_strict_acc"]
    assert ifbench_process_results(words, [""])["inst_level_loose_acc"] == [False, False]
    # Loose scoring drops a preamble line: strict fails, loose passes.
    preamble = ifbench_process_results(no_space, ["Here is my answer:\nParticlesabove10ppmfoulbiosensors."])
    assert not preamble["prompt_level_strict_acc"] and preamble["prompt_level_loose_acc"]
    assert preamble["checker_errors"] == []


@needs_benchmarks
@pytest.mark.slow
def test_scoring_mmlu_items_gives_predictions_consistent_with_the_accuracy(prepared_model_dir, tmp_path):
    settings = {**SETTINGS, "limit": {"mmlu_med": 2}}
    out, items_path = tmp_path / "mmlu_med.json", tmp_path / "mmlu_med.items.jsonl"
    result = evaluate_benchmark(model_dir=str(prepared_model_dir), model_name="base", benchmark_name="mmlu_med",
                                benchmarks_dir=str(SHARED_BENCHMARKS), settings=settings, out_json=str(out),
                                out_items=str(items_path), seed=0)
    items = _lines(items_path)
    assert result["status"] == "ok" and result["n"] == len(items) == 12
    for item in items:
        assert item["predicted"] == max(item["logliks"], key=item["logliks"].get)
        assert item["correct"] == (item["predicted"] == item["answer"])
    acc = sum(i["correct"] for i in items) / len(items)
    assert result["metrics"]["acc"]["value"] == pytest.approx(acc)
    low, high = result["metrics"]["acc"]["ci95"]
    assert low <= acc <= high
    assert {s: v["n"] for s, v in result["per_subject"].items()} == {s: 2 for s in MMLU_SUBJECTS}
    test_ids = {r["id"] for r in _lines(SHARED_BENCHMARKS / "mmlu_med" / "test.jsonl")}
    assert {i["id"] for i in items} <= test_ids


def test_vllm_backend_says_what_is_missing_on_a_machine_without_it():
    import importlib.util

    from balancedbio.evaluation import language_model

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(RuntimeError, match=r"eval.backend: vllm needs the vllm package"):
        language_model("unused", {**SETTINGS, "backend": "vllm"})
    with pytest.raises(ValueError, match="unknown eval.backend"):
        language_model("unused", {**SETTINGS, "backend": "tgi"})


def _medqa_row(i, answer):
    return {"id": f"q{i}", "question": f"Question {i}?", "answer": answer,
            "options": {"A": f"Dopamine {i}", "B": f"Adrenaline {i}", "C": f"Cortisol {i}", "D": f"Bradykinin {i}"}}


def test_answers_given_as_option_text_index_or_letter_map_to_the_right_key(tmp_path):
    # Issue 17.2: the first character of the option text ("Bradykinin" is option D) was taken as
    # the key, so a file of option-text answers was scored against wrong keys. Truth: D, B, C, C, B.
    answers = ["Bradykinin 0", "Adrenaline 1", "C", 2, "1"]
    (tmp_path / "medqa").mkdir()
    (tmp_path / "medqa" / "test.jsonl").write_text(
        "".join(json.dumps(_medqa_row(i, a)) + "\n" for i, a in enumerate(answers)), encoding="utf-8")
    source = locate(BENCHMARKS["medqa"], str(tmp_path))
    [task] = build_tasks(_task_manager(), task_specs(BENCHMARKS["medqa"], source, SETTINGS))
    assert [doc["answer"] for doc in task.eval_docs] == ["D", "B", "C", "C", "B"]


@pytest.mark.parametrize("content, message", [
    (b"ROW0\nROW1\n{\"id\": \"q2\", \"question\": \"x\",,}\n", r"medqa/test.jsonl:3: not valid JSON"),
    (b"", r"medqa/test.jsonl: the file is empty"),
    (b"ROW0\n{\"id\": \"q1\", \"question\": \"caf\xff\"}\n", r"medqa/test.jsonl:2: not valid UTF-8 \(byte 0xff"),
    (b"ROW0\nROW_EMPTY\n", r"medqa/test.jsonl:2: answer '' is neither one of the letters A, B, C, D"),
    (b"ROW_SEVEN\n", r"medqa/test.jsonl:1: answer index 7 is out of range for 4 options"),
    (b"ROW0\nROW_TEXT\n", r"medqa/test.jsonl:2: answer 'epsilon' is neither"),
])
def test_a_bad_benchmark_file_fails_with_one_line_naming_file_line_and_fault(tmp_path, content, message):
    from balancedbio.io import DataFormatError

    rows = {b"ROW0": _medqa_row(0, "A"), b"ROW1": _medqa_row(1, "B"), b"ROW_EMPTY": _medqa_row(1, ""),
            b"ROW_SEVEN": _medqa_row(0, "7"), b"ROW_TEXT": _medqa_row(1, "epsilon")}
    for key, row in rows.items():
        content = content.replace(key, json.dumps(row).encode())
    (tmp_path / "medqa").mkdir()
    (tmp_path / "medqa" / "test.jsonl").write_bytes(content)
    with pytest.raises(DataFormatError, match=message) as caught:
        evaluate_benchmark(model_dir="never-loaded", model_name="base", benchmark_name="medqa",
                           benchmarks_dir=str(tmp_path), settings=SETTINGS, out_json=str(tmp_path / "r.json"),
                           out_items=str(tmp_path / "r.items.jsonl"))
    assert "\n" not in str(caught.value) and str(tmp_path) in str(caught.value)
    assert not (tmp_path / "r.json").exists()

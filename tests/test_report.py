"""The report from a small fixture of result files the test writes itself."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess

import pytest

from balancedbio.report import alignment_tax, build_report, load_results, paired_difference

# Hand-made item outcomes: IFEval strict per prompt and medical correctness per question.
IFEVAL = {"base": [1, 1, 1, 0], "grpo_full": [1, 0, 1, 0], "grpo_static_weights": [0, 0, 1, 0]}
MEDICAL = {"base": [0, 0, 1, 1, 0, 0], "grpo_full": [1, 0, 1, 1, 1, 0], "grpo_static_weights": [0, 0, 1, 1, 0, 0]}


def _write_results(root, model, ifeval, medical):
    folder = root / "eval" / model
    folder.mkdir(parents=True)
    items = [{"task": "bb_ifeval", "doc_id": i, "prompt_level_strict_acc": bool(v), "inst_level_strict_acc": [bool(v)],
              "instruction_id_list": ["punctuation:no_comma"]} for i, v in enumerate(ifeval)]
    (folder / "ifeval.items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    p = sum(ifeval) / len(ifeval)
    metric = {"value": p, "ci95": [max(0, p - 0.3), min(1, p + 0.3)]}
    (folder / "ifeval.json").write_text(json.dumps({
        "benchmark": "ifeval", "model": model, "status": "ok", "n": len(ifeval),
        "metrics": {m: metric for m in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                                        "inst_level_loose_acc")} | {"n_instructions": len(ifeval)}}))
    subjects = {"anatomy": medical[:3], "college_biology": medical[3:]}
    items, per_subject = [], {}
    for subject, outcomes in subjects.items():
        for i, v in enumerate(outcomes):
            items.append({"task": f"bb_mmlu_med_{subject}", "doc_id": i, "answer": "A",
                          "predicted": "A" if v else "B", "correct": bool(v)})
        acc = sum(outcomes) / len(outcomes)
        per_subject[subject] = {"n": len(outcomes), "acc": acc, "ci95": [0.0, 1.0]}
    (folder / "mmlu_med.items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    acc = sum(medical) / len(medical)
    (folder / "mmlu_med.json").write_text(json.dumps({
        "benchmark": "mmlu_med", "model": model, "status": "ok", "n": len(medical),
        "metrics": {"acc": {"value": acc, "ci95": [max(0, acc - 0.3), min(1, acc + 0.3)]}},
        "per_subject": per_subject}))
    (folder / "cmexam.json").write_text(json.dumps({"benchmark": "cmexam", "model": model, "status": "skipped",
                                                    "reason": "cmexam/test.jsonl does not exist"}))
    (folder / "cmexam.items.jsonl").write_text("")


@pytest.fixture()
def run_dir(tmp_path):
    results = tmp_path / "results"
    for model in IFEVAL:
        _write_results(results, model, IFEVAL[model], MEDICAL[model])
    for variant, moving in (("full", True), ("static_weights", False)):
        folder = results / f"grpo_{variant}"
        folder.mkdir()
        rows = []
        for step in range(1, 5):
            w = 1.0 + 0.1 * step if moving else 1.0
            rows.append({"step": step, "reward": 0.5, "kl": 0.01 * step, "completion_length": 60,
                         "s_cos": None if step == 2 else 0.2 / step, "l_orth": 0.0,
                         "weight_accuracy": w, "weight_instruction": 2 - w,
                         "reward_accuracy": 0.1 * step, "reward_instruction": 0.5})
        (folder / "dynamics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prm = results / "prm.json"
    prm.write_text(json.dumps({"test": {"n": 10, "macro_f1": 0.9, "accuracy": 0.92,
                                        "per_class_f1": {"valid": 0.9, "neutral": 0.95, "fallacious": 0.85}},
                               "test_chain_ranking": {"pairs": 5, "sound_above_flawed": 1.0}}))
    decon = results / "decontamination.json"
    decon.write_text(json.dumps({"outputs": {"sft": {"total": 10, "kept": 9, "dropped": 1,
                                                     "dropped_by_benchmark": {"mmlu_med": 1}}}}))
    return results


def test_alignment_tax_and_domain_gain_on_a_hand_made_example(run_dir):
    results = load_results(run_dir / "eval")
    rows = {r["model"]: r for r in alignment_tax(results)}
    # base IFEval 3/4, grpo_full 2/4: tax = 0.75 - 0.5; medical 2/6 -> 4/6: gain = +1/3.
    assert rows["grpo_full"]["alignment_tax"]["value"] == pytest.approx(0.25)
    assert rows["grpo_full"]["domain_gain"]["value"] == pytest.approx(1 / 3)
    assert rows["grpo_static_weights"]["domain_gain"]["value"] == pytest.approx(0.0)
    assert rows["grpo_full"]["alignment_tax"]["n"] == 4
    tax = rows["grpo_full"]["alignment_tax"]
    assert tax["ci_low"] <= tax["value"] <= tax["ci_high"] and not tax["significant"]  # 4 items: too few


def test_paired_difference_is_significant_only_when_the_interval_excludes_zero():
    same = {str(i): float(i % 2) for i in range(200)}
    better = {k: 1.0 for k in same}
    assert paired_difference(better, same)["significant"]
    assert not paired_difference(same, dict(same))["significant"]
    assert paired_difference({"a": 1.0}, {"b": 1.0}) is None


def test_report_builds_tables_figures_and_honest_wording(run_dir, tmp_path):
    out = tmp_path / "report"
    summary = build_report(eval_dir=str(run_dir / "eval"), results_dir=str(run_dir), out_dir=str(out),
                           prm_metrics=str(run_dir / "prm.json"), decontamination=str(run_dir / "decontamination.json"),
                           config={"run_name": "fixture", "model": {"source": "embedded:x"}, "seed": 1},
                           versions={"torch": "x"})
    with open(out / "tables" / "table1_main.csv") as handle:
        table1 = list(csv.DictReader(handle))
    assert {(r["model"], r["benchmark"]) for r in table1} == {(m, b) for m in IFEVAL for b in ("ifeval", "mmlu_med")}
    assert len([r for r in table1 if r["benchmark"] == "ifeval"]) == 3 * 4  # four IFEval metrics per model
    with open(out / "tables" / "skipped.csv") as handle:
        skipped = list(csv.DictReader(handle))
    assert [(r["model"], r["reason"]) for r in skipped][0] == ("base", "cmexam/test.jsonl does not exist")
    with open(out / "tables" / "table2_ablations.csv") as handle:
        ablations = {r["variant"]: r for r in csv.DictReader(handle)}
    assert set(ablations) == {"full", "static_weights"} and float(ablations["full"]["weight_accuracy"]) == 1.4
    with open(out / "tables" / "mmlu_subjects.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3 * 2
    for name in ("weights", "rewards", "aoc", "kl_length", "pareto"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000
    markdown = (out / "report.md").read_text()
    assert "not significant" in markdown and "Alignment tax of grpo_full" in markdown
    assert "cmexam/test.jsonl does not exist" in markdown
    assert any("Dynamic vs static weights" in line for line in summary["findings"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed (make test installs it)")
def test_report_html_opens_in_headless_chromium_and_shows_the_figures(run_dir, tmp_path):
    from PIL import Image, ImageStat

    out = tmp_path / "report"
    build_report(eval_dir=str(run_dir / "eval"), results_dir=str(run_dir), out_dir=str(out),
                 prm_metrics=str(run_dir / "prm.json"), decontamination=str(run_dir / "decontamination.json"))
    page = (out / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-figures="(\d+)" data-figures-loaded="(\d+)"', dom.stdout)
    assert loaded and int(loaded.group(1)) >= 5 and loaded.group(1) == loaded.group(2), dom.stdout[:500]
    assert "<table>" in dom.stdout and "Alignment tax" in dom.stdout
    shot = tmp_path / "shot.png"
    result = subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,3000", page],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    image = Image.open(shot).convert("L")
    stat = ImageStat.Stat(image)
    assert stat.stddev[0] > 10, "the screenshot is blank"
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # text, tables and plots, not one colour

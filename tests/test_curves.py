"""Learning curves (issue 23): held-out rewards logged every k GRPO steps, disjoint from the training prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _tiny_run_inputs(tmp_path):
    from fault_sft_job import build_grpo_inputs

    return build_grpo_inputs(tmp_path)


def test_curve_callback_logs_heldout_rewards_at_every_kth_step_before_the_last(tmp_path):
    from balancedbio.config import load_config
    from balancedbio.grpo import run_grpo
    from balancedbio.grpo.curves import curve_set_path
    from balancedbio.io import write_json
    from balancedbio.variants import variant_settings

    mcq, prompts = _tiny_run_inputs(tmp_path)
    # Two accuracy items (one of them answered 'A', one 'B') and one instruction item: n is counted per component.
    items = [{"id": f"kg:q{i}", "component": "accuracy", "prompt": f"w{7 + i} w8", "answer": answer,
              "options": {"A": "w3", "B": "w4"}} for i, answer in enumerate("AB")]
    items.append({"id": "inst:1", "component": "instruction", "prompt": "w9 w10",
                  "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
    dynamics = tmp_path / "run" / "dynamics.jsonl"
    dynamics.parent.mkdir()
    write_json(curve_set_path(dynamics), {"every_steps": 2, "max_new_tokens": 4, "batch_size": 2,
                                          "dtype": "float32", "instruction_mode": "strict", "items": items})
    config = load_config(Path(__file__).resolve().parents[1] / ".test" / "config" / "config.yaml")
    settings = variant_settings(config, "no_prm")
    settings["grpo"].update(max_steps=5, save_steps=100, max_completion_length=4, rollout_weights="policy")
    settings["aoc"]["mode"] = "off"
    settings["report_to"] = []
    run_grpo(model_dir=str(tmp_path / "model"), mcq_path=str(mcq), prompts_path=str(prompts), prm_dir=None,
             out_dir=str(tmp_path / "out"), dynamics_path=str(dynamics),
             checkpoint_dir=str(tmp_path / "checkpoints"), settings=settings)

    rows = {row["step"]: row for row in map(json.loads, dynamics.read_text().splitlines())}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    # Steps 2 and 4; not 1, 3, nor the last (the trained model's end-point table is that point).
    for step in (1, 3, 5):
        assert not any(key.startswith("heldout_") for key in rows[step]), step
    for step in (2, 4):
        row = rows[step]
        assert row["heldout_accuracy_n"] == 2 and row["heldout_instruction_n"] == 1
        assert row["heldout_accuracy"] in (0.0, 0.5, 1.0)  # the mean of two 0/1 rewards
        assert row["heldout_accuracy_low"] <= row["heldout_accuracy"] <= row["heldout_accuracy_high"]
        assert 0.0 <= row["heldout_instruction"] <= 1.0
        assert row["heldout_seconds"] > 0


def test_curve_metrics_are_the_heldout_summary_of_the_scored_rows():
    from balancedbio.grpo.curves import curve_metrics
    from balancedbio.heldout import score_items

    items = [{"id": "kg:1", "component": "accuracy", "prompt": "q", "answer": "B", "options": {"A": "x", "B": "y"}},
             {"id": "kg:2", "component": "accuracy", "prompt": "q", "answer": "A", "options": {"A": "x", "B": "y"}},
             {"id": "inst:1", "component": "instruction", "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
              "kwargs": [{}]}]
    rows = score_items(items, ["Reasoning.\nAnswer: B", "Answer: B", "no comma here"])
    record = curve_metrics(rows)
    assert record["heldout_accuracy"] == 0.5 and record["heldout_accuracy_n"] == 2
    assert record["heldout_instruction"] == 1.0 and record["heldout_instruction_n"] == 1
    assert 0 < record["heldout_accuracy_low"] < 0.5 < record["heldout_accuracy_high"] < 1  # Wilson, n = 2


def test_a_heldout_item_that_is_a_training_prompt_is_refused(tmp_path):
    from balancedbio.data.formatting import format_mcq_prompt
    from balancedbio.grpo.curves import check_disjoint

    mcq, prompts = _tiny_run_inputs(tmp_path)
    fresh = [{"id": "kg:9", "prompt": format_mcq_prompt("w7 w8", {"A": "w3", "B": "w4"})},
             {"id": "inst:9", "prompt": "w9 w10"}]
    check_disjoint(fresh, str(mcq), str(prompts))
    for leaked in ({"id": "kg:1", "prompt": format_mcq_prompt("w1 w2", {"A": "w3", "B": "w4"})},
                   {"id": "inst:1", "prompt": "w5 w6"}):
        with pytest.raises(ValueError, match=leaked["id"]):
            check_disjoint([*fresh, leaked], str(mcq), str(prompts))


def test_curves_off_or_no_set_registers_nothing(tmp_path):
    from balancedbio.grpo.curves import curve_set_path, load_curve_set

    dynamics = tmp_path / "dynamics.jsonl"
    assert load_curve_set(curve_set_path(dynamics)) is None
    curve_set_path(dynamics).write_text(json.dumps({"every_steps": 0, "max_new_tokens": 8, "batch_size": 1,
                                                    "items": []}))
    assert load_curve_set(curve_set_path(dynamics)) is None
    curve_set_path(dynamics).write_text(json.dumps({"every_steps": 2, "items": []}))
    with pytest.raises(ValueError, match="max_new_tokens"):
        load_curve_set(curve_set_path(dynamics))


@pytest.mark.slow
def test_the_smoke_runs_curve_set_is_disjoint_from_its_grpo_training_prompts(smoke_workdir, smoke_config):
    from balancedbio.data.formatting import format_mcq_prompt
    from balancedbio.grpo.curves import write_curve_set
    from balancedbio.heldout import heldout_settings
    from balancedbio.io import read_jsonl

    data = smoke_workdir / "results" / "data"
    train_mcq, train_prompts = data / "clean" / "mcq_train.jsonl", data / "clean" / "prompts.jsonl"
    curve_set = write_curve_set(
        str(smoke_workdir / "curve_set.json"), every_steps=1, mcq_test=str(data / "kg" / "mcq_test.jsonl"),
        graph=str(data / "kg" / "graph.json.gz"), train_mcq=str(train_mcq), train_prompts=str(train_prompts),
        settings=heldout_settings(smoke_config), instruct_config=smoke_config["instruct"],
        instruction_mode="strict", seed=smoke_config["seed"], benchmarks_dir=smoke_config["benchmarks_dir"])
    items = curve_set["items"]
    assert {i["component"] for i in items} == {"accuracy", "instruction"}
    trained = {format_mcq_prompt(r["question"], r["options"]) for r in read_jsonl(train_mcq)}
    trained |= {r["prompt"] for r in read_jsonl(train_prompts)}
    assert not trained & {i["prompt"] for i in items}
    train_ids = {f"kg:{r['id']}" for r in read_jsonl(train_mcq)}
    assert not train_ids & {i["id"] for i in items if i["component"] == "accuracy"}


def test_report_draws_each_variants_curve_from_the_sft_start_with_wilson_intervals(tmp_path):
    from balancedbio.report.curves import CURVES_FIGURE, curve_points, make_curve_figures, table_point
    from balancedbio.report.load import RunData
    from balancedbio.report.stats import wilson_interval

    def row(step, accuracy=None):
        extra = {} if accuracy is None else {
            "heldout_accuracy": accuracy, "heldout_accuracy_n": 40.0, "heldout_instruction": 0.5,
            "heldout_instruction_n": 30.0, "heldout_instruction_low": 0.4, "heldout_instruction_high": 0.6}
        return {"step": step, "loss": 0.0, **extra}

    dynamics = {"full": [row(1), row(2, 0.25), row(3), row(4, 0.5), row(5)], "no_aoc": [row(2, 0.2), row(4, 0.3)],
                "static_weights": [row(1), row(2)]}  # no curves logged: not drawn
    points = curve_points(dynamics["full"], "accuracy")
    assert [p["step"] for p in points] == [2, 4]
    assert [points[1]["low"], points[1]["high"]] == wilson_interval(0.5, 40)
    assert curve_points(dynamics["full"], "instruction")[0]["low"] == 0.4
    sft = {"summary": {"status": "ok", "components": {"accuracy": {"mean": 0.1, "n": 40},
                                                      "instruction": {"mean": 0.45, "n": 30, "ci_low": 0.3,
                                                                      "ci_high": 0.6}}}, "items": {}}
    trained = {"summary": {"status": "ok", "components": {"accuracy": {"mean": 0.6, "n": 50}}}, "items": {}}
    assert table_point({"sft": sft}, "sft", "accuracy", 0)["low"] == wilson_interval(0.1, 40)[0]
    assert table_point({"grpo_full": trained}, "grpo_full", "instruction", 5) is None
    captions = make_curve_figures(RunData({}, {"sft": sft, "grpo_full": trained}, dynamics), tmp_path)
    # n of the curve points (30, 40) and of full's end point (its end-point table, 50)
    assert list(captions) == [CURVES_FIGURE] and "n = 30, 40, 50" in captions[CURVES_FIGURE]
    assert (tmp_path / f"{CURVES_FIGURE}.png").stat().st_size > 10_000
    assert make_curve_figures(RunData({}, {}, {"full": [row(1)]}), tmp_path / "none") == {}


def test_curves_answer_from_the_trainers_rollout_copy_when_its_dtype_matches():
    """One merged copy of the policy in memory, not two (at 7B a second bf16 copy is ~15 GB)."""
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from balancedbio.grpo.curves import HeldoutCurves
    from balancedbio.rollout import RolloutCopy

    policy = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2))
    trainer = SimpleNamespace(_rollout_copy=RolloutCopy(policy, "float32"))
    curve_set = {"every_steps": 1, "max_new_tokens": 4, "batch_size": 2, "items": [{"id": "x"}]}
    same = HeldoutCurves(trainer, {**curve_set, "dtype": "float32"})
    assert same.merged_copy(policy) is trainer._rollout_copy
    with torch.no_grad():  # a policy update reaches the copy the curve answers from
        policy.lm_head.weight.add_(1.0)
    assert torch.equal(same.merged_copy(policy).model.lm_head.weight, policy.lm_head.weight)
    other = HeldoutCurves(trainer, {**curve_set, "dtype": "bfloat16"})
    copy = other.merged_copy(policy)
    assert copy is not trainer._rollout_copy and next(copy.model.parameters()).dtype == torch.bfloat16
    alone = HeldoutCurves(SimpleNamespace(_rollout_copy=None), {**curve_set, "dtype": "float32"})
    assert isinstance(alone.merged_copy(policy), RolloutCopy)

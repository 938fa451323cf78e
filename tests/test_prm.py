"""The process reward model trained by the smoke run: metrics, ranking, conclusions, resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from transformers import TrainerCallback

from balancedbio.checkpoints import MARKER
from balancedbio.data.formatting import format_reasoning
from balancedbio.io import read_jsonl, write_jsonl
from balancedbio.prm import SETTINGS_FILE, PRMScorer, chain_ranking, train_prm
from balancedbio.rewards import ReasoningReward

pytestmark = pytest.mark.slow


def test_metrics_report_held_out_f1_and_confusion(smoke_workdir):
    metrics = json.loads((smoke_workdir / "results" / "prm" / "metrics.json").read_text())
    test = metrics["test"]
    assert test["n"] > 50
    assert set(test["per_class_f1"]) == {"valid", "neutral", "fallacious"}
    assert np.array(test["confusion_matrix"]["matrix"]).sum() == test["n"]
    assert test["macro_f1"] > 0.45, "well above the 0.33 of a constant or random classifier"
    png = smoke_workdir / "results" / "prm" / "confusion_matrix.png"
    assert png.stat().st_size > 10_000
    assert not (smoke_workdir / "results" / "prm" / "checkpoints").exists(), "checkpoints are cleared on success"


def test_prm_ranks_sound_chains_above_planted_fallacies(smoke_workdir):
    """Held-out questions (entities never seen in training): each sound chain against the same
    question's chains with planted fallacies (corrupted fact, wrong inference, non-sequitur)."""
    scorer = PRMScorer(smoke_workdir / "results" / "models" / "prm")
    chains = [c for c in read_jsonl(smoke_workdir / "results" / "data" / "clean" / "steps.jsonl")
              if c["split"] == "test"]
    ranking = chain_ranking(scorer, chains)
    assert ranking["pairs"] >= 10
    # Chance is 0.5; the smoke PRM measured 0.93 on 14 pairs, the embedded default's 0.84 on 200.
    assert ranking["sound_above_flawed"] >= 0.75, ranking


def _clean_chains(workdir):
    return list(read_jsonl(workdir / "results" / "data" / "clean" / "steps.jsonl"))


def test_reasoning_reward_punishes_a_wrong_final_letter(default_prm_workdir):
    """Held-out sound chains, written as the SFT targets are (their facts, then 'Answer: X'), score
    lower under the trained default PRM (config/config.yaml) when they end in a wrong letter, on
    every chain, as GRPO calls the reward (with the prompt's ``answer`` column).

    The PRM alone barely tells the letters apart at the CPU default's 1,000 training examples: the
    mean right-minus-wrong difference without the answer key was 0.0002-0.0003 with a 95% interval
    that contained 0 on 2026-12-04 (55-87 of 100 chains won across seeds and CPUs on 2026-12-03),
    so since issue 24 the conclusion step takes the key's sign and carries half of the PRM score: a
    wrong final letter always lowers R_reas (a step chain cannot buy it back).
    """
    prm_dir = default_prm_workdir / "results" / "models" / "prm"
    reward = ReasoningReward(PRMScorer(prm_dir), gamma=0.001, length_target=200)
    sound = [c for c in _clean_chains(default_prm_workdir) if c["split"] == "test" and c["chain"] == "sound"][:100]
    assert len(sound) >= 50
    right, wrong = [], []
    for chain in sound:
        facts = [s["text"] for s in chain["steps"] if s["label"] == "valid" and s["fact"]["relation"] != "conclusion"]
        letters = [chain["answer"]] + [x for x in chain["options"] if x != chain["answer"]]
        n = len(letters)
        values = reward(prompts=[chain["question"]] * n, completions=[format_reasoning(facts, x) for x in letters],
                        capability=["medical"] * n, question=[chain["question"]] * n,
                        options=[chain["options"]] * n, answer=[chain["answer"]] * n)
        right.append(values[0])
        wrong.append(max(values[1:]))
    # The same words but for one letter: the length term is equal; the best wrong letter still loses.
    difference = np.array(right) - np.array(wrong)
    assert (difference > 0).all(), (int((difference > 0).sum()), len(difference))
    half_width = 1.96 * difference.std(ddof=1) / np.sqrt(len(difference))
    assert difference.mean() - half_width > 0.1, (difference.mean(), half_width, len(difference))


def test_scorer_reads_max_length_from_the_saved_settings(smoke_workdir, smoke_config, tmp_path):
    prm_dir = smoke_workdir / "results" / "models" / "prm"
    saved = json.loads((prm_dir / SETTINGS_FILE).read_text())
    assert PRMScorer(prm_dir).max_length == saved["max_length"] == smoke_config["prm"]["max_length"]
    copy = tmp_path / "prm"
    shutil.copytree(prm_dir, copy)
    (copy / SETTINGS_FILE).write_text(json.dumps({**saved, "max_length": 24}))
    scorer = PRMScorer(copy)
    assert scorer.max_length == 24
    long_pair = ("question " * 100, "step " * 100)
    assert len(scorer.tokenizer(*long_pair, truncation="longest_first", max_length=scorer.max_length)["input_ids"]) == 24
    (copy / SETTINGS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=SETTINGS_FILE):
        PRMScorer(copy)


def test_prm_sft_and_grpo_share_no_question_and_no_disease_family(smoke_workdir):
    data = smoke_workdir / "results" / "data"
    questions = {q["id"]: q for q in read_jsonl(data / "kg" / "mcq_train.jsonl")}
    sets = {
        "prm": {c["question_id"] for c in _clean_chains(smoke_workdir) if c["split"] == "train"},
        "sft": {c["question_id"] for c in read_jsonl(data / "clean" / "sft.jsonl") if c["capability"] == "medical"},
        "grpo": {q["id"] for q in read_jsonl(data / "clean" / "mcq_train.jsonl") if q.get("source", "kg") == "kg"},
    }
    assert all(len(ids) >= 3 for ids in sets.values()), {k: len(v) for k, v in sets.items()}
    assert set().union(*sets.values()) <= set(questions)
    for use, ids in sets.items():
        assert {questions[i]["use"] for i in ids} == {use}
    families = {use: {f for i in ids for f in questions[i]["families"]} for use, ids in sets.items()}
    genes = {use: {g for i in ids for g in questions[i]["entities"]["genes"]} for use, ids in sets.items()}
    for a, b in (("prm", "sft"), ("prm", "grpo"), ("sft", "grpo")):
        assert not sets[a] & sets[b], (a, b)
        assert not families[a] & families[b], (a, b)
        assert not genes[a] & genes[b], (a, b)
    assert any(families.values())
    stats = json.loads((data / "kg" / "stats.json").read_text())
    assert stats["train_uses"] == {use: sum(q["use"] == use for q in questions.values()) for use in sets}


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated crash")


def test_training_resumes_from_the_last_checkpoint(smoke_workdir, tmp_path):
    chains = list(read_jsonl(smoke_workdir / "results" / "data" / "clean" / "steps.jsonl"))
    steps = tmp_path / "steps.jsonl"
    write_jsonl(steps, [c for c in chains if c["split"] == "train"][:12] + [c for c in chains if c["split"] == "test"][:3])
    config = {"max_length": 64, "batch_size": 8, "learning_rate": 1e-4, "epochs": 1, "save_steps": 2,
              "max_train_examples": 48, "max_eval_questions": 1}
    kwargs = dict(steps_path=str(steps), encoder="embedded:all-minilm-l6-v2", out_dir=str(tmp_path / "prm"),
                  metrics_path=str(tmp_path / "metrics.json"), checkpoint_dir=str(tmp_path / "ckpt"),
                  prm_config=config, seed=0)
    with pytest.raises(KeyboardInterrupt):
        train_prm(**kwargs, callbacks=[_Interrupt()])
    assert (tmp_path / "ckpt" / "checkpoint-2").is_dir()
    assert not (tmp_path / "prm").exists(), "no half-written model after a crash"
    assert (tmp_path / "ckpt" / "checkpoint-2" / MARKER).is_file()
    # A kill while saving checkpoint-30 left only its config: it is skipped, not resumed from.
    torn = tmp_path / "ckpt" / "checkpoint-30"
    torn.mkdir()
    shutil.copy(tmp_path / "ckpt" / "checkpoint-2" / "config.json", torn / "config.json")
    metrics = train_prm(**kwargs)
    assert metrics["resumed"] is True and metrics["resumed_from"].endswith("checkpoint-2")
    assert (tmp_path / "prm" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "prm" / SETTINGS_FILE).read_text())["max_length"] == 64
    assert not (tmp_path / "ckpt").exists()


def test_training_starts_fresh_beside_a_torn_checkpoint(smoke_workdir, tmp_path):
    chains = _clean_chains(smoke_workdir)
    steps = tmp_path / "steps.jsonl"
    write_jsonl(steps, [c for c in chains if c["split"] == "train"][:6] + [c for c in chains if c["split"] == "test"][:3])
    (tmp_path / "ckpt" / "checkpoint-30").mkdir(parents=True)
    (tmp_path / "ckpt" / "checkpoint-30" / "config.json").write_text("{}")
    config = {"max_length": 48, "batch_size": 8, "learning_rate": 1e-4, "epochs": 1, "save_steps": 100,
              "max_train_examples": 16, "max_eval_questions": 1}
    metrics = train_prm(steps_path=str(steps), encoder="embedded:all-minilm-l6-v2", out_dir=str(tmp_path / "prm"),
                        metrics_path=str(tmp_path / "metrics.json"), checkpoint_dir=str(tmp_path / "ckpt"),
                        prm_config=config, seed=0)
    assert metrics["resumed"] is False and metrics["resumed_from"] is None
    assert metrics["train_examples"] == 16 and (tmp_path / "prm" / "model.safetensors").is_file()

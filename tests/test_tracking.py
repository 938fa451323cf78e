"""Experiment tracking (logging.report_to) and the start-up checks of trackers and library versions."""

from __future__ import annotations

import math

import pytest
from packaging.requirements import Requirement

from balancedbio import versions
from balancedbio.config import ConfigError
from balancedbio.io import write_jsonl

STEPS = [("The patient has a fever.", "valid"), ("Fever often means infection.", "neutral"),
         ("So the answer is a broken leg.", "fallacious")]


def _chains(n_questions: int, split: str) -> list[dict]:
    chains = []
    for q in range(n_questions):
        question = f"Question {split} {q}: which finding fits case {q}?"
        sound = [{"text": f"{text} (case {q})", "label": "valid"} for text, _ in STEPS]
        flawed = [{"text": f"{text} (case {q})", "label": label} for text, label in STEPS]
        chains.append({"question_id": f"{split}{q}", "question": question, "chain": "sound", "steps": sound,
                       "split": split})
        chains.append({"question_id": f"{split}{q}", "question": question, "chain": "flawed", "steps": flawed,
                       "split": split})
    return chains


def _train_tiny_prm(tmp_path, report_to):
    from balancedbio.prm import train_prm

    steps = tmp_path / "steps.jsonl"
    write_jsonl(steps, _chains(2, "train") + _chains(1, "test"))
    config = {"max_length": 32, "batch_size": 8, "learning_rate": 1e-4, "epochs": 1, "save_steps": 100,
              "max_train_examples": None, "max_eval_questions": None}
    return train_prm(steps_path=str(steps), encoder="embedded:all-minilm-l6-v2", out_dir=str(tmp_path / "models" / "prm"),
                     metrics_path=str(tmp_path / "prm" / "metrics.json"),
                     checkpoint_dir=str(tmp_path / "prm" / "checkpoints"), prm_config=config, seed=0,
                     report_to=report_to)


def test_prm_training_writes_tensorboard_events_that_outlive_the_checkpoints(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    _train_tiny_prm(tmp_path, ["tensorboard"])
    assert not (tmp_path / "prm" / "checkpoints").exists(), "the checkpoint folder is cleared on success"
    runs = [p for p in (tmp_path / "prm" / "tensorboard").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    assert list(runs[0].glob("events.out.tfevents.*")), "no event file"
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    # 12 step examples, batch 8: 2 optimizer steps, one logged loss each.
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), losses


def test_no_tracker_writes_no_events(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    _train_tiny_prm(tmp_path, [])
    assert not (tmp_path / "prm" / "tensorboard").exists()


def test_a_tracker_that_is_not_installed_is_named_at_config_time():
    installed = {"tensorboard"}
    versions.check_trackers(["tensorboard"], find_spec=lambda m: object() if m in installed else None)
    with pytest.raises(ConfigError, match=r"logging.report_to: 'wandb' needs the wandb package"):
        versions.check_trackers(["tensorboard", "wandb"], find_spec=lambda m: object() if m in installed else None)


def test_the_schema_defaults_to_tensorboard(smoke_config):
    assert smoke_config["logging"]["report_to"] == ["tensorboard"]


def test_version_outside_the_supported_range_names_package_and_range(monkeypatch):
    requirements = [Requirement("trl>=1.16,<1.17"), Requirement("lm-eval[ifeval]>=0.4.12,<0.5"),
                    Requirement("torch>=2.4"), Requirement("absent-package>=1")]
    fake = {"trl": "1.17.0", "lm-eval": "0.4.13", "torch": "2.13.0+cu128"}
    monkeypatch.setattr(versions, "declared_requirements", lambda extras=(): requirements)
    problems = versions.version_problems(lookup=fake.get)
    assert problems == ["trl 1.17.0 is installed, but BalancedBio supports trl<1.17,>=1.16"]
    with pytest.raises(versions.UnsupportedVersionError, match=r"trl 1\.17\.0 .* supports trl<1\.17,>=1\.16"):
        versions.check_versions(lookup=fake.get)
    fake["trl"] = "1.16.2"
    versions.check_versions(lookup=fake.get)


def test_declared_ranges_are_the_ones_the_code_needs():
    declared = {r.name: r.specifier for r in versions.declared_requirements()}
    assert "1.16.0" in declared["trl"] and "1.17.0" not in declared["trl"]
    assert "5.24.0" in declared["transformers"] and "6.0" not in declared["transformers"]
    assert "0.4.11" not in declared["lm-eval"] and "0.4.12" in declared["lm-eval"] and "0.5" not in declared["lm-eval"]
    for name in ("scikit-learn", "scipy", "Jinja2", "tensorboard", "if-verifiable", "peft", "accelerate"):
        assert name in declared


def test_the_installed_environment_passes_the_start_up_check():
    versions.check_versions()

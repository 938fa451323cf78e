"""SFT's held-out validation split and its precision choice (no training here; the smoke run trains)."""

from __future__ import annotations

import json

import pytest
import torch

from balancedbio.io import DataFormatError
from balancedbio.models import bf16_autocast
from balancedbio.sft import conversation_pairs


def _conversations(path, n):
    rows = [{"capability": "medical", "messages": [{"role": "user", "content": f"question {i}"},
                                                   {"role": "assistant", "content": f"Answer: {'ABCD'[i % 4]}"}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_validation_conversations_are_never_trained_on(tmp_path):
    path = _conversations(tmp_path / "sft.jsonl", 50)
    train, validation = conversation_pairs(str(path), max_examples=20, seed=3, val_examples=10)
    questions = lambda pairs: {p["prompt"][-1]["content"] for p in pairs}  # noqa: E731
    assert len(train) == 20 and len(validation) == 10
    assert not questions(train) & questions(validation)
    again_train, again_validation = conversation_pairs(str(path), max_examples=20, seed=3, val_examples=10)
    assert again_train == train and again_validation == validation  # seeded
    # Without a validation split the training draw is the one before this change.
    plain, none = conversation_pairs(str(path), max_examples=20, seed=3)
    assert none == [] and len(plain) == 20
    with pytest.raises(DataFormatError, match="sft.val_examples = 50 leaves no training conversation"):
        conversation_pairs(str(path), val_examples=50)


def test_mixed_precision_follows_the_setting_and_the_probe(monkeypatch):
    assert bf16_autocast("bf16", "sft.mixed_precision") and not bf16_autocast("fp32", "sft.mixed_precision")
    assert bf16_autocast("fp32", "sft.mixed_precision", bf16_weights=True)  # bf16 weights imply it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("balancedbio.rollout.faster_dtype", lambda: torch.float32)
    assert not bf16_autocast("auto", "prm.mixed_precision")
    monkeypatch.setattr("balancedbio.rollout.faster_dtype", lambda: torch.bfloat16)
    assert bf16_autocast("auto", "prm.mixed_precision")
    with pytest.raises(ValueError, match="prm.mixed_precision 'fast'"):
        bf16_autocast("fast", "prm.mixed_precision")

"""SFT's held-out validation split and its precision choice (no training here; the smoke run trains)."""

from __future__ import annotations

import json

import pytest
import torch

from balancedbio.io import DataFormatError
from balancedbio.sft import conversation_pairs, sft_mixed_precision


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
    assert sft_mixed_precision("bf16", False) and not sft_mixed_precision("fp32", False)
    assert sft_mixed_precision("fp32", True)  # bf16 weights imply it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("balancedbio.rollout.faster_dtype", lambda: torch.float32)
    assert not sft_mixed_precision("auto", False)
    monkeypatch.setattr("balancedbio.rollout.faster_dtype", lambda: torch.bfloat16)
    assert sft_mixed_precision("auto", False)
    with pytest.raises(ValueError, match="sft.mixed_precision 'fast'"):
        sft_mixed_precision("fast", False)

"""The trainer itself refuses AOC where it cannot work (ZeRO-3 shards the gradients and weights AOC needs),
whatever the entry point (the Snakemake config check, a recipe, a script of one's own)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("trl")


def _build(monkeypatch, mode: str):
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig

    from balancedbio.grpo import BalancedGRPOTrainer
    from balancedbio.rewards import AccuracyReward, InstructionReward
    from balancedbio.weights import PIDWeights
    from test_distributed import VOCAB, _tokenizer

    class UnderZero3(BalancedGRPOTrainer):
        """Once the accelerator exists, its state reports a ZeRO-3 DeepSpeed plugin (DeepSpeed is not
        installed on CPU machines; the check reads only the plugin's stage)."""

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            monkeypatch.setattr(AcceleratorState, "deepspeed_plugin",
                                property(lambda state: SimpleNamespace(zero_stage=3)))

    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    dataset = Dataset.from_list([{"prompt": "w1 w2", "capability": "medical", "answer": "A"},
                                 {"prompt": "w3 w4", "capability": "instruction", "answer": None}])
    args = GRPOConfig(output_dir="unused", per_device_train_batch_size=4, num_generations=2, beta=0.0,
                      max_completion_length=4, report_to=[], use_cpu=True, bf16=False)
    try:
        return UnderZero3(model=LlamaForCausalLM(config), reward_funcs=[AccuracyReward(), InstructionReward()],
                          args=args, train_dataset=dataset, processing_class=_tokenizer(),
                          weight_controller=PIDWeights(["accuracy", "instruction"]), aoc_config={"mode": mode})
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("mode", ["penalty", "project", "monitor"])
def test_zero3_with_aoc_is_refused_in_the_trainer(monkeypatch, mode):
    with pytest.raises(ValueError, match=f"aoc.mode={mode}.*ZeRO-3.*aoc.mode: off"):
        _build(monkeypatch, mode)


def test_zero3_without_aoc_builds(monkeypatch):
    assert _build(monkeypatch, "off").aoc["mode"] == "off"

"""The merged sampling copy of the policy (balancedbio.rollout) on a tiny random Llama + LoRA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from balancedbio.rollout import RolloutCopy, faster_dtype, merged_state  # noqa: E402


def _policy(tie: bool = True):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, pad_token_id=0, eos_token_id=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # LoRA's B starts at zero; give the adapters a real effect
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval()


TOKENS = torch.tensor([[5, 9, 3, 17, 22, 8], [4, 4, 30, 12, 1, 7]])


@pytest.mark.parametrize("tie", [True, False])
def test_float32_copy_reproduces_the_lora_policy(tie):
    policy = _policy(tie)
    copy = RolloutCopy(policy, "float32")
    assert not any(n for n, _ in copy.model.named_modules() if "lora" in n), "the copy is a plain model"
    with torch.no_grad():
        expected, got = policy(TOKENS).logits, copy.model(TOKENS).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # The adapters matter here, so the check above is not vacuous.
    with torch.no_grad(), policy.disable_adapter():
        assert (policy(TOKENS).logits - expected).abs().max() > 1e-2


def test_sync_follows_a_training_update():
    policy = _policy()
    copy = RolloutCopy(policy, "float32")
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_A" in name:
                param.add_(0.3)
        before = copy.model(TOKENS).logits
        copy.sync(policy)
        after, expected = copy.model(TOKENS).logits, policy(TOKENS).logits
    assert (before - expected).abs().max() > 1e-2, "stale until synced"
    assert torch.allclose(after, expected, atol=1e-5)
    assert all(not p.requires_grad for p in copy.model.parameters())


def test_bfloat16_copy_is_close_and_the_policy_stays_float32():
    policy = _policy()
    copy = RolloutCopy(policy, "bfloat16")
    assert next(copy.model.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    with torch.no_grad():
        expected = torch.softmax(policy(TOKENS).logits, -1)
        got = torch.softmax(copy.model(TOKENS).logits.float(), -1)
    assert (got - expected).abs().max() < 0.05


def test_merged_state_has_plain_keys_only():
    state = merged_state(_policy())
    assert "model.layers.0.self_attn.q_proj.weight" in state
    assert not [k for k in state if "lora_" in k or "base_layer" in k]


def test_faster_dtype_is_a_dtype_this_machine_can_multiply():
    assert faster_dtype(size=128, repeats=2) in (torch.float32, torch.bfloat16)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="rollout dtype 'fp8'"):
        RolloutCopy(_policy(), "fp8")


def test_grpo_trainer_samples_from_the_synced_copy(tmp_path):
    """One real GRPO step: generation goes through the copy, training through the LoRA policy."""
    from datasets import Dataset
    from trl import GRPOConfig

    from balancedbio.grpo import BalancedGRPOTrainer
    from balancedbio.rewards import AccuracyReward, InstructionReward
    from balancedbio.weights import PIDWeights
    from test_grpo_trainer import VOCAB, _tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    dataset = Dataset.from_list([{"prompt": "w1 w2", "capability": "medical", "answer": "A"},
                                 {"prompt": "w3 w4", "capability": "instruction", "answer": None}])
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, beta=0.0,
                      max_completion_length=4, max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = BalancedGRPOTrainer(
        model=LlamaForCausalLM(config), reward_funcs=[AccuracyReward(), InstructionReward()], args=args,
        train_dataset=dataset, processing_class=_tokenizer(), weight_controller=PIDWeights(["accuracy", "instruction"]),
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"),
        rollout_weights="float32")
    calls = []
    original = trainer._rollout_copy.model.generate
    trainer._rollout_copy.model.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    trainer.train()
    assert calls, "the rollout copy generated the completions"
    assert trainer.model_wrapped is not trainer._rollout_copy.model, "the training model is restored"
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)

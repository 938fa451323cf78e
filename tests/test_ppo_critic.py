"""The ``ppo`` ablation's critic under bf16 (GPU configs): a frozen bf16 backbone with LoRA, so it fits
beside a 7B policy on every rank; on the CPU default the full fp32 copy as before."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from balancedbio.ppo import ValueCritic, critic_settings  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    folder = tmp_path_factory.mktemp("critic") / "tiny"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return str(folder)


def test_critic_settings_follow_training_bf16():
    assert critic_settings(False, False) == {"dtype": torch.float32, "lora_rank": None,
                                             "gradient_checkpointing": False}
    assert critic_settings(True, True, lora_rank=64) == {"dtype": torch.bfloat16, "lora_rank": 64,
                                                         "gradient_checkpointing": True}
    assert critic_settings(True, False)["lora_rank"] == 16


def test_bf16_lora_critic_trains_adapters_and_head_only_and_learns(tiny_model_dir):
    torch.manual_seed(0)
    critic = ValueCritic(tiny_model_dir, **critic_settings(True, True, lora_rank=2))
    trainable = {name: p for name, p in critic.named_parameters() if p.requires_grad}
    frozen = [p for p in critic.parameters() if not p.requires_grad]
    assert trainable and all("lora_" in name or name.startswith("value_head") for name in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)  # the backbone: half the bytes, no optimizer state
    assert all(p.dtype == torch.float32 for p in trainable.values())
    full = ValueCritic(tiny_model_dir)
    assert sum(p.numel() for p in trainable.values()) < 0.2 * sum(p.numel() for p in full.parameters())
    # It learns: a few AdamW steps on fixed returns lower the masked value loss.
    critic.train()
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 32, (4, 6), generator=generator)
    mask = torch.ones(4, 6)
    returns = torch.randn(4, 6, generator=generator)
    losses = []
    for _ in range(20):
        values = critic(input_ids, mask.long())
        assert values.dtype == torch.float32
        loss = 0.5 * (((values - returns) ** 2) * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses

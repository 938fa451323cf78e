"""The "w/o GRPO" ablation (Table 2): the same trainer and rewards, a learned critic instead of
the group baseline.

TRL 1.16 ships neither ``PPOTrainer`` nor value heads, so this small piece is ours and kept
apart from the GRPO path. ``CriticAdvantage`` is a mixin that only changes where the advantage
comes from; ``balancedbio.grpo.CriticAdvantageTrainer`` puts it in front of
``BalancedGRPOTrainer``. This module imports nothing of ``balancedbio.grpo``, so the dependency
runs one way (grpo -> ppo):

- a ``ValueCritic`` (a copy of the policy's backbone + a linear value head, its own AdamW)
  predicts V(s_t) for every completion token. Under ``training.bf16`` (the GPU configs) the
  copy must fit beside the policy on every rank: its backbone is frozen in bf16 with LoRA
  adapters (fp32) and gradient checkpointing, only adapters and head are trained (a full fp32
  7B critic with its own AdamW is ~112 GB per GPU; this one ~15 GB + activations);
- the reward is sparse: R_total (the same weighted composite) on the last completion token,
  0 elsewhere; the KL term stays in TRL's loss, as in GRPO;
- per-token advantages come from GAE (Schulman et al. 2016) and are whitened over the
  batch's completion tokens; TRL's loss accepts (B, T) advantages as they are;
- after each policy step the critic regresses the GAE returns (masked MSE); under data
  parallel every rank averages the critic's gradients in one collective.

Everything else (sampling, clipping, KL, weights, AOC, logging, checkpoints) is inherited.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from balancedbio.aoc import average_across_ranks

log = logging.getLogger(__name__)

CRITIC_WEIGHTS = "critic.safetensors"
CRITIC_OPTIMIZER = "critic_optimizer.pt"


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns for right-padded (B, T) sequences.

    ``mask`` is 1 on real completion tokens; the step after a sequence's last token is terminal
    (value 0), so nothing leaks across the padding.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
    steps = values.shape[1]
    for t in reversed(range(steps)):
        nonterminal = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        next_value = values[:, t + 1] * nonterminal if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * nonterminal * running
        advantages[:, t] = running * mask[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mask = mask.to(values.dtype)
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    var = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) / (var.sqrt() + eps) * mask


class ValueCritic(nn.Module):
    """Policy backbone copy + value head; returns one value per input position.

    ``lora_rank``: the backbone is frozen (in ``dtype``) and LoRA adapters on all its linear
    layers are trained with the fp32 head; ``gradient_checkpointing`` recomputes activations.
    """

    def __init__(self, model_dir: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
                 lora_rank: int | None = None, gradient_checkpointing: bool = False):
        super().__init__()
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                             use_safetensors=True)
        if gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora_rank:
            from peft import LoraConfig, get_peft_model

            backbone = get_peft_model(backbone, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                           target_modules="all-linear", lora_dropout=0.0))
        self.backbone, self.compute_dtype = backbone, dtype
        hidden = backbone.config.hidden_size
        self.value_head = nn.Linear(hidden, 1, dtype=torch.float32)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        low_precision = self.compute_dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(input_ids.device.type, dtype=self.compute_dtype, enabled=low_precision):
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.value_head(hidden.float()).squeeze(-1)


def critic_settings(bf16: bool, gradient_checkpointing: bool, lora_rank: int | None = None) -> dict:
    """How the critic is built: the full fp32 copy on the CPU default, a bf16 LoRA critic under bf16.

    ``lora_rank``: the policy's, when it has LoRA (else 16).
    """
    if not bf16:
        return {"dtype": torch.float32, "lora_rank": None, "gradient_checkpointing": gradient_checkpointing}
    return {"dtype": torch.bfloat16, "lora_rank": lora_rank or 16, "gradient_checkpointing": gradient_checkpointing}


class CriticAdvantage:
    """Mixin for a ``BalancedGRPOTrainer``: GAE advantages from a learned critic."""

    def __init__(self, *args, critic_model_dir: str, ppo_config: dict, **kwargs):
        self.ppo = {"gamma": 1.0, "gae_lambda": 0.95, "critic_learning_rate": 1e-5, "critic_max_grad_norm": 1.0,
                    **ppo_config}
        super().__init__(*args, **kwargs)
        peft_config = getattr(self.accelerator.unwrap_model(self.model), "peft_config", None) or {}
        policy_rank = next((getattr(c, "r", None) for c in peft_config.values()), None)
        settings = critic_settings(bool(self.args.bf16), bool(self.args.gradient_checkpointing), policy_rank)
        self.critic = ValueCritic(critic_model_dir, **settings).to(self.accelerator.device)
        self.critic_optimizer = torch.optim.AdamW([p for p in self.critic.parameters() if p.requires_grad],
                                                  lr=self.ppo["critic_learning_rate"])

    def _critic_values(self, batch: dict) -> torch.Tensor:
        prompt_ids, completion_ids = batch["prompt_ids"], batch["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        values = self.critic(input_ids, attention)
        start = prompt_ids.shape[1] - 1  # the state before each completion token is emitted
        return values[:, start:start + completion_ids.shape[1]]

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mask = output["completion_mask"]
        rows = mask.shape[0]
        totals = (self._last_rewards_per_func * self.reward_weights.to(mask.device).unsqueeze(0)).nansum(dim=1)
        offset = self.accelerator.process_index * rows
        totals = totals[offset:offset + rows].to(torch.float32)
        lengths = mask.sum(dim=1).long()
        rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        has_tokens = lengths > 0
        rewards[has_tokens, lengths[has_tokens] - 1] = totals[has_tokens]
        with torch.no_grad():
            values = self._critic_values(output).float() * mask
        advantages, returns = gae(rewards, values, mask, self.ppo["gamma"], self.ppo["gae_lambda"])
        output["advantages"] = whiten(advantages, mask)
        output["returns"] = returns
        return output

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        self._critic_batch = inputs if self.model.training else None
        return inputs

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        batch = getattr(self, "_critic_batch", None)
        if batch is not None:
            self.critic.train()
            mask = batch["completion_mask"].float()
            values = self._critic_values(batch).float()
            value_loss = 0.5 * (((values - batch["returns"]) ** 2) * mask).sum() / mask.sum().clamp(min=1)
            self.critic_optimizer.zero_grad()
            value_loss.backward()
            if self.accelerator.num_processes > 1:
                # Every rank holds a critic copy: average their gradients, one collective that every
                # rank calls with the same shapes (a parameter without a gradient counts as zero).
                params = [p for p in self.critic.parameters() if p.requires_grad]
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                for param, grad in zip(params, average_across_ranks(grads)):
                    param.grad = grad.to(param.dtype)
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.ppo["critic_max_grad_norm"])
            self.critic_optimizer.step()
            self._metrics["train"]["value_loss"].append(float(value_loss))
        return loss

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from safetensors.torch import save_file

            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            save_file(self._critic_trained_state(), str(folder / CRITIC_WEIGHTS))
            torch.save(self.critic_optimizer.state_dict(), folder / CRITIC_OPTIMIZER)

    def _critic_trained_state(self) -> dict:
        """The critic's trained tensors (all of them, or the adapters and head of a LoRA critic)."""
        params = dict(self.critic.named_parameters())
        partial = any(not p.requires_grad for p in params.values())
        return {k: v.detach().contiguous() for k, v in self.critic.state_dict().items()
                if not partial or (k in params and params[k].requires_grad)}

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and (Path(checkpoint) / CRITIC_WEIGHTS).exists():
            from safetensors.torch import load_file

            self.critic.load_state_dict(load_file(str(Path(checkpoint) / CRITIC_WEIGHTS)), strict=False)
            # Optimizer state is tensors and plain numbers only.
            self.critic_optimizer.load_state_dict(torch.load(Path(checkpoint) / CRITIC_OPTIMIZER, weights_only=True))
            log.info("restored the critic from %s", checkpoint)

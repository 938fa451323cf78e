"""A sampling copy of the policy for GRPO rollouts on one device without vLLM.

TRL samples from the training model itself: LoRA adapters unmerged (two extra small matmuls
and a dropout per projection, per token) and in the training dtype. On CPU that is most of a
GRPO step. ``RolloutCopy`` keeps a plain model with the adapters merged, optionally in bfloat16,
and copies the current policy weights into it before every generation, the way TRL syncs
weights into vLLM. Sampling from bfloat16 weights slightly changes the sampling distribution;
the loss still uses the fp32 policy's own log-probabilities (as with vLLM, without
importance-sampling correction). Measured in bench/rollout.py and bench/README.md.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

log = logging.getLogger(__name__)

ROLLOUT_WEIGHTS = ("policy", "float32", "bfloat16", "auto")


def faster_dtype(device: torch.device | str | None = None, size: int = 768, repeats: int = 5) -> torch.dtype:
    """bfloat16 if ``device`` (the CPU by default) multiplies bfloat16 matrices faster than float32 ones.

    A CUDA device: bfloat16 wherever it supports it (tensor cores; no CPU benchmark, which would
    say nothing about the GPU). The CPU: those with AVX512-BF16 or AMX are several times faster
    in bfloat16, AVX2-only ones emulate it and are much slower; a short measurement decides
    instead of a CPU-flag table.
    """
    if torch.device(device or "cpu").type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        timings[dtype] = time.perf_counter() - start
    return torch.bfloat16 if timings[torch.bfloat16] < 0.8 * timings[torch.float32] else torch.float32


def merged_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights with LoRA adapters merged, keyed like the plain (non-peft) model."""
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft absent: full fine-tuning only
        LoraLayer = ()  # noqa: N806
    state: dict[str, torch.Tensor] = {}
    lora_prefixes = []
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            lora_prefixes.append(name + ".")
            weight = module.get_base_layer().weight.detach()
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    weight = weight + module.get_delta_weight(adapter).detach()
            state[f"{name}.weight"] = weight
            bias = getattr(module.get_base_layer(), "bias", None)
            if bias is not None:
                state[f"{name}.bias"] = bias.detach()
    for name, tensor in base.state_dict().items():
        if any(name.startswith(prefix) for prefix in lora_prefixes):
            continue  # base_layer / lora_A / lora_B of a merged projection
        state[name] = tensor.detach()
    return state


def copy_dtype(dtype: str, policy: torch.nn.Module) -> torch.dtype:
    """The torch dtype a merged copy of ``policy`` takes for ``dtype`` (auto: decided for the device the
    policy, hence the copy, lives on)."""
    return faster_dtype(next(policy.parameters()).device) if dtype == "auto" else getattr(torch, dtype)


class RolloutCopy:
    """A merged (optionally bfloat16) copy of the policy that TRL's generation samples from."""

    def __init__(self, policy: torch.nn.Module, dtype: str = "auto"):
        if dtype not in ROLLOUT_WEIGHTS[1:]:
            raise ValueError(f"rollout dtype {dtype!r}: expected one of {ROLLOUT_WEIGHTS[1:]}")
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        self.dtype = copy_dtype(dtype, policy)
        config = copy.deepcopy(base.config)
        # A fresh model of the same architecture (no adapters), filled by sync() before each use.
        with torch.device("meta"):
            model = type(base)(config)
        model.requires_grad_(False)
        self.model = model.to_empty(device=next(base.parameters()).device)
        # Buffers that are not in the state dict (rotary inv_freq) come from the policy as they are.
        source_buffers = dict(base.named_buffers())
        for name, buffer in self.model.named_buffers():
            if name in source_buffers:
                buffer.copy_(source_buffers[name])
        self.model = self.model.to(self.dtype).eval()
        self.model.generation_config = copy.deepcopy(base.generation_config)
        self._keys = set(self.model.state_dict())
        self.sync(policy)
        log.info("GRPO rollouts sample from a merged %s copy of the policy", str(self.dtype).replace("torch.", ""))

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        state = merged_state(policy)
        missing = self._keys - set(state)
        if missing:
            raise RuntimeError(f"rollout copy: the policy has no weights for {sorted(missing)[:5]}")
        self.model.load_state_dict({k: state[k] for k in self._keys}, strict=True)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

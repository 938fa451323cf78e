"""The passes behind ``OrthogonalityMixin`` (``balancedbio.grpo.aoc``): context managers around TRL's
``_compute_loss``, the accumulation window of one optimizer step, batched norms and the penalty's
Hessian-vector products (probes)."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from balancedbio.aoc import add_gradients


def _rng_state() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


class _restored_rng:
    """Run a block with a saved RNG state, then put the current one back."""

    def __init__(self, state: tuple):
        self.state = state

    def __enter__(self):
        self.saved = _rng_state()
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state_all(self.state[1])

    def __exit__(self, *exc):
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state_all(self.saved[1])
        return False


class _quiet_loss:
    """TRL's ``_compute_loss`` without its metrics, its collectives or its entropy controller's update.

    AOC evaluates extra losses (per capability, at shifted weights) that TRL must not log, and
    under data parallel a rank may run fewer of them than another (one capability only on it):
    a gather there would wait for ranks that never join. Inside the block the accelerator's
    gather/reduce act on the local tensor only (they feed metrics alone in ``_compute_loss``).
    """

    _COLLECTIVES = ("gather", "gather_for_metrics", "reduce")
    _CONTROLLER = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")

    def __init__(self, trainer):
        self.trainer = trainer

    def __enter__(self):
        trainer, accelerator = self.trainer, self.trainer.accelerator
        self.metrics = trainer._metrics
        trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.controller = {name: getattr(trainer, name) for name in self._CONTROLLER if hasattr(trainer, name)}
        accelerator.gather = lambda tensor: tensor
        accelerator.gather_for_metrics = lambda tensor, *args, **kwargs: tensor
        accelerator.reduce = lambda tensor, reduction="sum", scale=1.0: tensor
        return self

    def __exit__(self, *exc):
        trainer = self.trainer
        for name in self._COLLECTIVES:
            trainer.accelerator.__dict__.pop(name, None)
        trainer._metrics = self.metrics
        for name, value in self.controller.items():
            setattr(trainer, name, value)
        return False


def full_precision(params) -> bool:
    """Whether every trainable weight is fp32 (fp32 master weights, not a bf16/fp16 engine)."""
    return all(p.dtype == torch.float32 for p in params)


class _fp32_forward:
    """Forward passes in the weights' own precision: autocast and TF32 off, also inside the wrappers.

    With ``bf16`` and fp32 master weights, accelerate wraps the model's forward in a bf16
    autocast and TRL's log-prob helper opens ``accelerator.autocast()``; the penalty's gradients
    and finite-difference probes need fp32 (under bf16 autocast the probe's cosine with the exact
    gradient fell to 0.52-0.83: bench/README.md, "AOC probes"), so both are switched off for the
    block, and so is TF32 (a 10-bit mantissa in CUDA matmuls; not measured, so not trusted).
    """

    def __init__(self, trainer, model):
        self.trainer, self.model = trainer, model

    def __enter__(self):
        self.wrapped_forward, self.autocast, self.tf32 = None, None, None
        if not full_precision(self.model.parameters()):
            return self  # bf16 weights (a DeepSpeed bf16 engine) need autocast: their own precision it is
        if "_original_forward" in self.model.__dict__:  # accelerate's autocast wrapper
            self.wrapped_forward = self.model.__dict__.get("forward")
            self.model.forward = self.model.__dict__["_original_forward"]
        self.trainer.accelerator.autocast = lambda *args, **kwargs: contextlib.nullcontext()
        device = next(self.model.parameters()).device.type
        self.autocast = torch.autocast(device_type=device, enabled=False)
        self.autocast.__enter__()
        self.tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        if self.autocast is None:
            return False
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.tf32
        self.autocast.__exit__(*exc)
        self.trainer.accelerator.__dict__.pop("autocast", None)
        if self.wrapped_forward is not None:
            self.model.forward = self.wrapped_forward
        return False


def _select_rows(inputs: dict, mask: torch.Tensor) -> dict:
    rows = mask.shape[0]
    return {key: value[mask] if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows
            else value for key, value in inputs.items()}


def total_norm(tensors) -> float:
    """The 2-norm of a list of tensors (``None`` = zero) with one host sync, not one per tensor."""
    present = [t.detach() for t in tensors if t is not None]
    if not present:
        return 0.0
    by_device: dict = defaultdict(list)
    for t in present:
        by_device[(t.device, t.dtype)].append(t)
    norms = [torch.stack(torch._foreach_norm(group)).float().to(present[0].device) for group in by_device.values()]
    return float(torch.linalg.vector_norm(torch.cat(norms)))


@dataclass
class AOCWindow:
    """What AOC accumulates over the micro-batches of one optimizer step (gradient accumulation).

    S_cos, the penalty and the projection are taken once, at the window's last micro-batch, from
    the window's summed g_R and g_I (TRL's loss is already divided by the accumulation steps), so
    GA = k applies the GA = 1 update of the same rows instead of one penalty per micro-batch.
    """

    grads: list = field(default_factory=lambda: [None, None])  # g_R, g_I: per-parameter lists
    parts: list = field(default_factory=lambda: [[], []])  # (rows, scale, rng) chunks per capability
    signal: torch.Tensor | None = None  # 1 where a capability has a non-zero advantage in the window
    loss: torch.Tensor | None = None

    def add(self, grads_r, grads_i, parts, signal: torch.Tensor, loss: torch.Tensor) -> None:
        for index, grads in enumerate((grads_r, grads_i)):
            self.grads[index] = list(grads) if self.grads[index] is None else add_gradients(self.grads[index], grads)
            self.parts[index].extend(parts[index] or [])
        self.signal = signal if self.signal is None else torch.maximum(self.signal, signal)
        self.loss = loss if self.loss is None else self.loss + loss

    def chunks(self) -> list:
        """Per capability: its chunks in the window, ``None`` where this rank saw none of its rows."""
        return [chunks or None for chunks in self.parts]


def finite_difference_hvp(step: float, base, shifted) -> list:
    """(g(theta + step v) - g(theta)) / step, parameter by parameter (``None`` where both are)."""
    out = []
    for g1, g0 in zip(shifted, base):
        if g1 is None and g0 is None:
            out.append(None)
            continue
        g1 = g1.float() if g1 is not None else torch.zeros_like(g0, dtype=torch.float32)
        g0 = g0.detach().float() if g0 is not None else torch.zeros_like(g1)
        out.append((g1 - g0) / step)
    return out


def probe_step(fd_step: float, params, direction) -> float | None:
    """The forward-difference step along ``direction``: ``fd_step`` times the weights' norm per unit of it."""
    v_norm = total_norm(direction)
    if v_norm == 0:
        return None
    return fd_step * max(total_norm(params), 1.0) / v_norm


def exact_hvp(loss_fn, params, direction) -> list:
    """H v of a loss by a double backward: grad((grad loss) . v), v held constant."""
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True, allow_unused=True)
    dot = sum((g * d.to(g.dtype)).sum() for g, d in zip(grads, direction) if g is not None and d is not None)
    if not torch.is_tensor(dot) or not dot.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(dot, params, allow_unused=True))


def is_nan(value: torch.Tensor) -> bool:
    return math.isnan(float(value.detach()))


def zeros_for_none(grads, params) -> list:
    return [g if g is not None else torch.zeros_like(p, dtype=torch.float32) for g, p in zip(grads, params)]


def add_to_grad(params, grads) -> None:
    """p.grad += g (in the parameter's dtype) for every gradient that is not ``None``."""
    for param, grad in zip(params, grads):
        if grad is not None:
            grad = grad.detach().to(param.dtype)
            param.grad = grad.clone() if param.grad is None else param.grad + grad


def projection_correction(a: float, b: float, grads_r, grads_i) -> list:
    """a g_R + b g_I - (g_R + g_I): what a projection adds to the plain policy gradient."""
    return [None if x is None and y is None else
            (a - 1.0) * (x.detach() if x is not None else 0) + (b - 1.0) * (y.detach() if y is not None else 0)
            for x, y in zip(grads_r, grads_i)]


def capability_loss_scale(loss_type: str, part: dict, whole: dict) -> float:
    """Factor that makes the sub-batch losses sum to the full-batch loss for this loss type."""
    if loss_type in {"grpo", "sapo", "luspo", "dr_grpo"}:  # mean over sequences
        return part["completion_ids"].shape[0] / whole["completion_ids"].shape[0]
    if loss_type == "bnpo":  # mean over the micro-batch's tokens
        return float(part["completion_mask"].sum() / whole["completion_mask"].sum().clamp(min=1))
    return 1.0  # dapo, cispo, vespo: normalised by the global token count already


def row_chunks(rows: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    """Row masks of at most ``size`` of the selected rows each (the whole selection for ``None``)."""
    indices = rows.nonzero().flatten()
    masks = []
    for chunk in indices.split(size or max(1, indices.numel())):
        mask = torch.zeros_like(rows)
        mask[chunk] = True
        masks.append(mask)
    return masks


def twice_differentiable_logps(trainer, model, input_ids, attention_mask, logits_to_keep: int,
                               compute_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TRL's per-token log-probs with plain (twice differentiable) ops.

    The penalty needs grad-of-grad; TRL's fused log-prob kernel has a first-order backward only.
    Same numbers for text models without logit scaling/soft-capping (Llama, Qwen, SmolLM). Fused
    attention kernels (flash, memory-efficient) lack a double backward too: the math one it is.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    with trainer.accelerator.autocast(), sdpa_kernel([SDPBackend.MATH]):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       logits_to_keep=logits_to_keep + 1).logits
    logits = logits[:, :-1, :] / trainer.temperature
    logps = selective_log_softmax(logits, input_ids[:, -logits_to_keep:])
    entropies = None
    if compute_entropy:
        with torch.no_grad():
            entropies = entropy_from_logits(logits)
    return logps, entropies


@contextlib.contextmanager
def shifted_weights(params, direction, step: float):
    """Weights at theta + step * direction inside the block, restored after it by copying the saved
    tensors back (exact, unlike adding and subtracting the shift)."""
    saved = [p.detach().clone() if d is not None else None for p, d in zip(params, direction)]
    try:
        with torch.no_grad():
            for p, d in zip(params, direction):
                if d is not None:
                    p.add_(d.to(p.dtype), alpha=step)
        yield
    finally:
        with torch.no_grad():
            for p, original in zip(params, saved):
                if original is not None:
                    p.copy_(original)

"""Active Orthogonality Control (eqs. 4-6): a mixin of ``BalancedGRPOTrainer`` that replaces ``training_step``
on AOC steps with per-capability gradients, S_cos and the penalty / projection (math in ``balancedbio.aoc``)."""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict

import torch

from balancedbio.aoc import (add_gradients, average_across_ranks, cosine_from_gramian, cosine_gradient_directions,
                             dynamic_lambda, gramian, orthogonality_penalty)
from balancedbio.grpo.sampler import CAPABILITIES


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


class _fp32_forward:
    """Forward passes in the weights' own precision: autocast off, also inside the wrappers.

    With ``bf16`` and fp32 master weights, accelerate wraps the model's forward in a bf16
    autocast and TRL's log-prob helper opens ``accelerator.autocast()``; AOC's gradients and
    finite-difference probes need fp32 (a forward difference of bf16 gradients is noise), so
    both are switched off for the block.
    """

    def __init__(self, trainer, model):
        self.trainer, self.model = trainer, model

    def __enter__(self):
        self.wrapped_forward, self.autocast = None, None
        if any(p.dtype != torch.float32 for p in self.model.parameters()):
            return self  # bf16 weights (a DeepSpeed bf16 engine) need autocast: their own precision it is
        if "_original_forward" in self.model.__dict__:  # accelerate's autocast wrapper
            self.wrapped_forward = self.model.__dict__.get("forward")
            self.model.forward = self.model.__dict__["_original_forward"]
        self.trainer.accelerator.autocast = lambda *args, **kwargs: contextlib.nullcontext()
        device = next(self.model.parameters()).device.type
        self.autocast = torch.autocast(device_type=device, enabled=False)
        self.autocast.__enter__()
        return self

    def __exit__(self, *exc):
        if self.autocast is None:
            return False
        self.autocast.__exit__(*exc)
        self.trainer.accelerator.__dict__.pop("autocast", None)
        if self.wrapped_forward is not None:
            self.model.forward = self.wrapped_forward
        return False


def _select_rows(inputs: dict, mask: torch.Tensor) -> dict:
    rows = mask.shape[0]
    return {key: value[mask] if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows
            else value for key, value in inputs.items()}



class OrthogonalityMixin:
    """AOC passes of ``BalancedGRPOTrainer`` (needs ``self.aoc``, ``self._step_record``, ``self.projector``)."""

    # -- Active Orthogonality Control -------------------------------------------------------
    def _capability_loss_scale(self, part: dict, whole: dict) -> float:
        """Factor that makes the sub-batch losses sum to the full-batch loss for this loss type."""
        if self.loss_type in {"grpo", "sapo", "luspo", "dr_grpo"}:  # mean over sequences
            return part["completion_ids"].shape[0] / whole["completion_ids"].shape[0]
        if self.loss_type == "bnpo":  # mean over the micro-batch's tokens
            return float(part["completion_mask"].sum() / whole["completion_mask"].sum().clamp(min=1))
        return 1.0  # dapo, cispo, vespo: normalised by the global token count already

    def capability_losses(self, model, inputs: dict, differentiable: bool = False, quiet: bool = False
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """TRL's loss on the medical rows and on the instruction rows (``None`` for one absent here).

        ``quiet``: without TRL's metrics and collectives (data parallel: the update's own forward
        logs them once on every rank, and a rank may hold one capability only).
        """
        is_medical = inputs["is_medical"]
        self._double_backward = differentiable
        # Remember each part (and its RNG state, for LoRA dropout) to re-evaluate it at shifted weights.
        self._capability_parts = []
        losses = []
        try:
            for rows in (is_medical, ~is_medical):
                if not bool(rows.any()):
                    self._capability_parts.append(None)
                    losses.append(None)
                    continue
                part = _select_rows(inputs, rows)
                rng = _rng_state()
                scale = self._capability_loss_scale(part, inputs)
                with (_quiet_loss(self) if quiet else contextlib.nullcontext()), self.compute_loss_context_manager():
                    losses.append(self._compute_loss(model, part) * scale)
                self._capability_parts.append([(part, scale, rng)])
        finally:
            self._double_backward = False
        return losses[0], losses[1]

    def _chunks(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Row masks of at most ``aoc.micro_batch_rows`` of the selected rows each (the whole selection for null)."""
        indices = rows.nonzero().flatten()
        size = self.aoc.get("micro_batch_rows") or max(1, indices.numel())
        masks = []
        for chunk in indices.split(size):
            mask = torch.zeros_like(rows)
            mask[chunk] = True
            masks.append(mask)
        return masks

    def capability_gradients(self, model, inputs: dict, params: list, differentiable: bool = False,
                             quiet: bool = False) -> tuple[list, list, torch.Tensor]:
        """g_R and g_I (the gradients of TRL's loss on the medical and on the instruction rows) and the loss.

        Each capability's rows are taken ``aoc.micro_batch_rows`` at a time, and each chunk's graph is
        freed once its gradient is taken, so memory does not grow with the batch. Every chunk's loss is
        scaled by its share of the batch (``_capability_loss_scale``), so the chunks' gradients add up
        to the capability's, and g_R + g_I is the gradient of TRL's loss on the whole batch. A
        capability absent here gives ``None`` for every parameter. With ``differentiable`` (the exact
        penalty gradient) the gradients keep their graphs (``create_graph``).
        """
        self._capability_parts = []
        gradients, total = [], torch.zeros((), device=params[0].device)
        self._double_backward = differentiable
        try:
            for rows in (inputs["is_medical"], ~inputs["is_medical"]):
                if not bool(rows.any()):
                    self._capability_parts.append(None)
                    gradients.append([None] * len(params))
                    continue
                chunks, summed = [], [None] * len(params)
                for mask in self._chunks(rows):
                    part = _select_rows(inputs, mask)
                    rng = _rng_state()  # LoRA dropout: a probe re-evaluates the chunk with the same masks
                    scale = self._capability_loss_scale(part, inputs)
                    with (_quiet_loss(self) if quiet else contextlib.nullcontext()), self.compute_loss_context_manager():
                        loss = self._compute_loss(model, part) * scale
                    grads = torch.autograd.grad(loss, params, create_graph=differentiable, allow_unused=True)
                    summed = add_gradients(summed, grads)
                    total = total + loss.detach()
                    chunks.append((part, scale, rng))
                self._capability_parts.append(chunks)
                gradients.append(summed)
        finally:
            self._double_backward = False
        return gradients[0], gradients[1], total

    def _gradient_at_shift(self, model, params, part_index: int, direction: list, step: float) -> list:
        """Gradient of one capability's loss at theta + step * direction (same chunks, same dropout).

        No autograd graph is alive here, and the weights are restored by copying the saved
        tensors back (exact, unlike adding and subtracting the shift); ``None`` everywhere when
        this rank holds no row of the capability.
        """
        chunks = self._capability_parts[part_index]
        if chunks is None:
            return [None] * len(params)
        saved = [p.detach().clone() if d is not None else None for p, d in zip(params, direction)]
        summed = [None] * len(params)
        try:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    if d is not None:
                        p.add_(d.to(p.dtype), alpha=step)
            for part, scale, rng in chunks:
                with _restored_rng(rng), _quiet_loss(self), _fp32_forward(self, model), \
                        self.compute_loss_context_manager():
                    loss = self._compute_loss(model, part) * scale
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                summed = add_gradients(summed, grads)
        finally:
            with torch.no_grad():
                for p, original in zip(params, saved):
                    if original is not None:
                        p.copy_(original)
        return summed

    def _penalty_gradient_fd(self, model, params, grads_r, grads_i, cosine: float, gram: torch.Tensor) -> list:
        """grad of S_cos^2 = 2 S (H_R v_R + H_I v_I), each H v by a forward difference of gradients.

        ``grads_r``/``grads_i`` are the global (rank-averaged) gradients, so the directions, the
        step sizes and hence the probes are the same on every rank; the shifted gradients of both
        probes are then averaged in one collective.
        """
        v_r, v_i = cosine_gradient_directions(grads_r, grads_i, cosine, gram)
        theta_norm = math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in params))
        probes = []  # (step, base gradient, shifted gradient)
        for index, (direction, base) in enumerate(((v_r, grads_r), (v_i, grads_i))):
            v_norm = math.sqrt(sum(float(d.float().pow(2).sum()) for d in direction if d is not None))
            if v_norm == 0:
                continue
            step = self.aoc["fd_step"] * max(theta_norm, 1.0) / v_norm
            probes.append((step, base, self._gradient_at_shift(model, params, index, direction, step)))
        if self._aoc_through_backward and probes:
            flat = [g if g is not None else torch.zeros_like(p, dtype=torch.float32)
                    for _, _, shifted in probes for g, p in zip(shifted, params)]
            averaged = average_across_ranks(flat)
            probes = [(step, base, averaged[i * len(params):(i + 1) * len(params)])
                      for i, (step, base, _) in enumerate(probes)]
        total = [None] * len(params)
        for step, base, shifted in probes:
            for k, (g1, g0) in enumerate(zip(shifted, base)):
                if g1 is None and g0 is None:
                    continue
                g1 = g1.float() if g1 is not None else torch.zeros_like(g0, dtype=torch.float32)
                g0 = g0.detach().float() if g0 is not None else torch.zeros_like(g1)
                hv = (g1 - g0) / step
                total[k] = hv if total[k] is None else total[k] + hv
        return [None if t is None else 2.0 * cosine * t for t in total]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **kwargs):
        if not getattr(self, "_double_backward", False):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
        # The penalty needs grad-of-grad; TRL's fused log-prob kernel has a first-order backward
        # only, so this path scores the completion with plain (twice differentiable) ops. Same
        # numbers for text models without logit scaling/soft-capping (Llama, Qwen, SmolLM).
        # Fused attention kernels (flash, memory-efficient) lack a double backward too: use the math one.
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        with self.accelerator.autocast(), sdpa_kernel([SDPBackend.MATH]):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           logits_to_keep=logits_to_keep + 1).logits
        logits = logits[:, :-1, :] / self.temperature
        logps = selective_log_softmax(logits, input_ids[:, -logits_to_keep:])
        entropies = None
        if compute_entropy:
            with torch.no_grad():
                entropies = entropy_from_logits(logits)
        return logps, entropies, None

    def _aoc_due(self) -> bool:
        return self.aoc["mode"] != "off" and self.state.global_step % max(1, self.aoc["interval"]) == 0

    def training_step(self, model, inputs, num_items_in_batch):
        if not (self.model.training and self._aoc_due()):
            return super().training_step(model, inputs, num_items_in_batch)
        started = time.perf_counter()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        loss = self.orthogonality_step(model, inputs)
        # The bookkeeping of GRPOTrainer.training_step, which this path replaces.
        self._step += 1
        self._current_train_step_time += time.perf_counter() - started
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return loss

    def orthogonality_step(self, model, inputs: dict) -> torch.Tensor:
        """Forward/backward of one micro-batch with AOC; leaves the gradients in ``p.grad``.

        Single process: the per-capability gradients (fp32) are combined and written to
        ``p.grad``. Data parallel (DDP, DeepSpeed): they are taken on the unwrapped model (no
        reduction hooks fire), averaged across ranks in one collective, every decision is made
        from the averaged values (so every rank takes the same branch), the finite-difference
        probes run with no graph alive, and the update is one ``accelerator.backward`` of TRL's
        loss plus the surrogate sum(p * g_orth): g_orth is the same on every rank, so after the
        wrapper's averaging the update is the single-process one.
        """
        mode = self.aoc["mode"]
        record = self._step_record
        distributed = self._aoc_through_backward
        differentiable = mode == "penalty" and self.aoc["penalty_gradient"] == "exact"
        module = self.accelerator.unwrap_model(model) if distributed else model
        params = [p for p in module.parameters() if p.requires_grad]
        is_medical, advantages = inputs["is_medical"], inputs["advantages"]
        if not distributed and (bool(is_medical.all()) or not bool(is_medical.any())):
            # One capability only in this micro-batch: S_cos is undefined, TRL's step as it is.
            record.update(s_cos=math.nan, l_orth=0.0, aoc_lambda=0.0, aoc_fired=False, aoc_note="single capability")
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            self.accelerator.backward(loss)
            return loss.detach()
        with _fp32_forward(self, module):
            # Under data parallel a rank may hold one capability only: its other gradient is zero here.
            grads_r, grads_i, capability_loss = self.capability_gradients(module, inputs, params, differentiable,
                                                                           quiet=distributed)
        # A capability whose groups all had zero reward variance has all-zero advantages: its policy
        # gradient is zero up to the KL term's rounding, so the cosine means nothing there.
        signal = torch.tensor([float(bool(advantages[rows].ne(0).any())) for rows in (is_medical, ~is_medical)],
                              device=advantages.device)
        if distributed:  # global g_R, g_I and signal flags, one collective on every rank
            flat = [g if g is not None else torch.zeros_like(p, dtype=torch.float32)
                    for grads in (grads_r, grads_i) for g, p in zip(grads, params)]
            averaged = average_across_ranks([*flat, signal.to(params[0].device)])
            grads_r, grads_i, signal = averaged[:len(params)], averaged[len(params):-1], averaged[-1]
        # One pass over the gradients: the Gramian gives S_cos, both norms and |g_R + g_I|.
        gram = gramian(grads_r, grads_i)
        cosine = cosine_from_gramian(gram, self.aoc["eps"])
        rr, ri, ii = (float(gram[0, 0].detach()), float(gram[0, 1].detach()), float(gram[1, 1].detach()))
        norm_r, norm_i = math.sqrt(rr), math.sqrt(ii)
        policy_norm = math.sqrt(max(rr + ii + 2 * ri, 0.0))
        no_signal = [name for name, flag in zip(CAPABILITIES, signal.tolist()) if flag == 0]
        if no_signal:
            cosine = torch.tensor(math.nan)
            record["aoc_note"] = f"zero advantages: {', '.join(no_signal)}"
        penalty, lam, grads_orth, unit_norm = None, 0.0, None, 0.0
        if mode == "penalty":
            unit_penalty = orthogonality_penalty(cosine, 1.0, self.aoc["tau"])
            if unit_penalty is not None:
                if differentiable:
                    grads_unit = torch.autograd.grad(unit_penalty, params, allow_unused=True)
                else:
                    grads_unit = self._penalty_gradient_fd(module, params, grads_r, grads_i,
                                                           float(cosine.detach()), gram)
                unit_norm = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads_unit if g is not None))
                lam = (dynamic_lambda(self.aoc["lambda"], policy_norm, unit_norm)
                       if self.aoc["lambda_scaling"] == "gradient_norm" else self.aoc["lambda"])
                penalty = (lam * unit_penalty).detach()
                grads_orth = [None if g is None else lam * g.detach() for g in grads_unit]
        record.update(s_cos=float(cosine.detach()), l_orth=float(penalty) if penalty is not None else 0.0,
                      aoc_lambda=lam, aoc_fired=penalty is not None, grad_norm_medical=norm_r,
                      grad_norm_instruction=norm_i, grad_norm_penalty=lam * unit_norm)

        if distributed:
            # TRL's loss through the DDP/DeepSpeed wrapper: one backward per micro-batch for its hooks,
            # and TRL's metrics and collectives once on every rank.
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            objective = loss
            if grads_orth is not None:  # a surrogate whose gradient is g_orth
                objective = loss + sum((p * g.to(p.dtype)).sum() for p, g in zip(params, grads_orth) if g is not None)
            self.accelerator.backward(objective)
            return loss.detach() + (penalty if penalty is not None else 0.0)

        if mode == "project" and not math.isnan(float(cosine.detach())):
            # One weighting call per step: GradVac's EMA target must advance once, not twice.
            coefficients = self.projector.combination(grads_r, grads_i, gram)
            combined = self.projector.apply(coefficients, [g.detach() if g is not None else None for g in grads_r],
                                            [g.detach() if g is not None else None for g in grads_i])
            record["projection_weights"] = list(coefficients)
        else:
            combined = [None if a is None and b is None else
                        (a.detach() if a is not None else 0) + (b.detach() if b is not None else 0)
                        for a, b in zip(grads_r, grads_i)]
        if grads_orth is not None:
            combined = add_gradients(combined, grads_orth)
        for param, grad in zip(params, combined):
            if grad is None:
                continue
            grad = grad.detach().to(param.dtype)
            param.grad = grad.clone() if param.grad is None else param.grad + grad
        return capability_loss + (penalty if penalty is not None else 0.0)


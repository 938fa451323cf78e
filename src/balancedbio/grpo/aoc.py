"""Active Orthogonality Control (eqs. 4-6): a mixin of ``BalancedGRPOTrainer`` that replaces ``training_step``
on AOC steps with per-capability gradients, S_cos and the penalty / projection (math in ``balancedbio.aoc``,
the passes' plumbing in ``balancedbio.grpo.aoc_passes``)."""

from __future__ import annotations

import contextlib
import math
import time

import torch

from balancedbio.aoc import (add_gradients, average_across_ranks, cosine_from_gramian, cosine_gradient_directions,
                             dynamic_lambda, gramian, orthogonality_penalty)
from balancedbio.grpo.aoc_passes import (AOCWindow, _fp32_forward, _quiet_loss, _restored_rng, _rng_state,
                                         _select_rows, add_to_grad, capability_loss_scale, exact_hvp,
                                         finite_difference_hvp, full_precision, is_nan, probe_step,
                                         projection_correction, row_chunks, shifted_weights, total_norm, zeros_for_none,
                                         twice_differentiable_logps)
from balancedbio.grpo.sampler import CAPABILITIES

__all__ = ["OrthogonalityMixin", "_fp32_forward"]


class OrthogonalityMixin:
    """AOC passes of ``BalancedGRPOTrainer`` (needs ``self.aoc``, ``self._step_record``, ``self.projector``)."""

    def capability_losses(self, model, inputs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """TRL's loss on the medical rows and on the instruction rows (``None`` for one absent here)."""
        losses = []
        for rows in (inputs["is_medical"], ~inputs["is_medical"]):
            part = _select_rows(inputs, rows) if bool(rows.any()) else None
            with self.compute_loss_context_manager():
                losses.append(None if part is None else
                              self._compute_loss(model, part) * capability_loss_scale(self.loss_type, part, inputs))
        return losses[0], losses[1]

    def capability_gradients(self, model, inputs: dict, params: list, differentiable: bool = False,
                             quiet: bool = False) -> tuple[list, list, torch.Tensor]:
        """g_R and g_I (the gradients of TRL's loss on the medical and on the instruction rows) and the loss.

        Each capability's rows are taken ``aoc.micro_batch_rows`` at a time, and each chunk's graph is
        freed once its gradient is taken, so memory does not grow with the batch. Every chunk's loss is
        scaled by its share of the batch (``_capability_loss_scale``), so g_R + g_I is the gradient of
        TRL's loss on the whole batch. A capability absent here gives ``None`` for every parameter.
        With ``differentiable`` (the exact penalty gradient) the gradients keep their graphs.

        Each chunk is kept for the probes with its dropout RNG state and, where TRL computed no
        old log-probs (one iteration per generation, no vLLM), with this pass's log-probs pinned
        as "old": TRL would otherwise take the shifted weights' own log-probs, the ratio would be
        1 there, and the probe would lose the -A grad(log pi) (grad(log pi) . v) term of H v.
        """
        self._capability_parts = []
        gradients, total = [], torch.zeros((), device=params[0].device)
        self._double_backward, self._record_logps = differentiable, True
        try:
            for rows in (inputs["is_medical"], ~inputs["is_medical"]):
                if not bool(rows.any()):
                    self._capability_parts.append(None)
                    gradients.append([None] * len(params))
                    continue
                chunks, summed = [], [None] * len(params)
                for mask in row_chunks(rows, self.aoc.get("micro_batch_rows")):
                    part = _select_rows(inputs, mask)
                    rng = _rng_state()  # LoRA dropout: a probe re-evaluates the chunk with the same masks
                    scale = capability_loss_scale(self.loss_type, part, inputs)
                    with (_quiet_loss(self) if quiet else contextlib.nullcontext()), self.compute_loss_context_manager():
                        loss = self._compute_loss(model, part) * scale
                    if part.get("old_per_token_logps") is None:
                        part = {**part, "old_per_token_logps": self._recorded_logps}
                    grads = torch.autograd.grad(loss, params, create_graph=differentiable, allow_unused=True)
                    summed = add_gradients(summed, grads)
                    total = total + loss.detach()
                    chunks.append((part, scale, rng))
                self._capability_parts.append(chunks)
                gradients.append(summed)
        finally:
            self._double_backward, self._record_logps, self._recorded_logps = False, False, None
        return gradients[0], gradients[1], total

    def _fp32_passes(self) -> bool:
        """Whether AOC's passes run in fp32: forward-difference probes difference fp32 passes; every other pass
        runs at the training's own precision (bf16 autocast moved S_cos by <= 3e-4, a forward difference to
        cosine 0.52, an exact H v under autocast 0.9999: bench/README.md, "AOC probes")."""
        return self.aoc["mode"] == "penalty" and self.aoc["penalty_gradient"] == "finite_difference"

    def _probe_loss(self, model, part: dict, scale: float, rng: tuple) -> torch.Tensor:
        # A probe runs at the precision of the pass it differs from.
        with (_restored_rng(rng), _quiet_loss(self),
              _fp32_forward(self, model) if self._fp32_passes() else contextlib.nullcontext(),
              self.compute_loss_context_manager()):
            return self._compute_loss(model, part) * scale

    def _gradient_at_shift(self, model, params, part_index: int, direction: list, step: float) -> list:
        """One capability's gradient at theta + step * direction (same chunks, dropout, "old"); ``None``s without rows."""
        summed = [None] * len(params)
        with shifted_weights(params, direction, step):
            for part, scale, rng in self._capability_parts[part_index] or []:
                loss = self._probe_loss(model, part, scale, rng)
                summed = add_gradients(summed, torch.autograd.grad(loss, params, allow_unused=True))
        return summed

    def _hessian_vector_product(self, model, params, part_index: int, direction: list) -> list:
        """H v of one capability's loss by a double backward, chunk by chunk (no weight shift)."""
        chunks = self._capability_parts[part_index]
        summed = [None] * len(params)
        self._double_backward = True
        try:
            for part, scale, rng in chunks or []:
                hv = exact_hvp(lambda: self._probe_loss(model, part, scale, rng), params, direction)
                summed = add_gradients(summed, hv)
        finally:
            self._double_backward = False
        return summed

    def _penalty_gradient_fd(self, model, params, grads_r, grads_i, cosine: float, gram: torch.Tensor) -> list:
        """grad of S_cos^2 = 2 S (H_R v_R + H_I v_I), each H v from a probe.

        fp32 weights: a forward difference of gradients (one gradient per probe). Weights in
        bf16/fp16 (a DeepSpeed bf16 engine), or ``aoc.penalty_gradient: hessian_vector`` (passes under
        bf16 autocast): a shift of ``fd_step`` is rounded away and the difference is noise, so H v
        is taken exactly by a double backward instead
        (agreement measured in bench/README.md, "AOC probes"). ``grads_r``/``grads_i`` are the
        global (rank-averaged) gradients, so directions and steps are the same on every rank, and
        the probes' results are averaged in one collective.
        """
        v_r, v_i = cosine_gradient_directions(grads_r, grads_i, cosine, gram)
        exact = not full_precision(params) or self.aoc["penalty_gradient"] == "hessian_vector"
        probes = []  # (step or None for an exact H v, base gradient, probe's result)
        for index, (direction, base) in enumerate(((v_r, grads_r), (v_i, grads_i))):
            if exact:
                probes.append((None, base, self._hessian_vector_product(model, params, index, direction)))
                continue
            step = probe_step(self.aoc["fd_step"], params, direction)
            if step is not None:
                probes.append((step, base, self._gradient_at_shift(model, params, index, direction, step)))
        if self._aoc_through_backward and probes:
            averaged = average_across_ranks([g for *_, result in probes for g in zeros_for_none(result, params)])
            probes = [(step, base, averaged[i * len(params):(i + 1) * len(params)])
                      for i, (step, base, _) in enumerate(probes)]
        total = [None] * len(params)
        for step, base, result in probes:
            hv = result if step is None else finite_difference_hvp(step, base, result)
            total = add_gradients(total, [None if h is None else h.float() for h in hv])
        return [None if t is None else 2.0 * cosine * t for t in total]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **kwargs):
        if not getattr(self, "_double_backward", False):
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
            if getattr(self, "_record_logps", False):
                self._recorded_logps = out[0].detach()
            return out
        logps, entropies = twice_differentiable_logps(self, model, input_ids, attention_mask, logits_to_keep,
                                                      compute_entropy)
        if getattr(self, "_record_logps", False):
            self._recorded_logps = logps.detach()
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

    def _backward(self, loss: torch.Tensor) -> None:
        # TRL's loss is divided by the accumulation steps already: DeepSpeed must not divide again (as HF does).
        kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}
        self.accelerator.backward(loss, **kwargs)

    def orthogonality_step(self, model, inputs: dict) -> torch.Tensor:
        """Forward/backward of one micro-batch with AOC; leaves the gradients in ``p.grad``.

        Every micro-batch adds its g_R + g_I to ``p.grad``: single process, the capability
        gradients themselves; data parallel (DDP, DeepSpeed), one ``accelerator.backward`` of
        TRL's loss through the wrapper (its hooks reduce the gradients). At the accumulation
        window's last micro-batch (``accelerator.sync_gradients``) the window's g_R and g_I
        (averaged across ranks in one collective) give S_cos and every decision, and the
        correction ``update - (g_R + g_I)`` (penalty: g_orth; project: (a-1) g_R + (b-1) g_I) is
        added once: directly, or as the surrogate sum(p * correction) in that backward, the same
        on every rank, so the update is the single-process, GA = 1 one.
        """
        distributed = self._aoc_through_backward
        differentiable = self.aoc["mode"] == "penalty" and self.aoc["penalty_gradient"] == "exact"
        module = self.accelerator.unwrap_model(model) if distributed else model
        params = [p for p in module.parameters() if p.requires_grad]
        window = getattr(self, "_aoc_window", None) or AOCWindow()
        self._aoc_window = window
        with _fp32_forward(self, module) if self._fp32_passes() else contextlib.nullcontext():
            grads_r, grads_i, capability_loss = self.capability_gradients(module, inputs, params, differentiable,
                                                                           quiet=distributed)
        # A capability whose groups all had zero reward variance has all-zero advantages: its policy
        # gradient is zero up to the KL term's rounding, so the cosine means nothing there.
        advantages, is_medical = inputs["advantages"], inputs["is_medical"]
        nonzero = advantages.ne(0).reshape(len(is_medical), -1).any(dim=1)  # no host sync
        signal = torch.stack([(nonzero & rows).any() for rows in (is_medical, ~is_medical)]).float().to(params[0].device)
        window.add(grads_r, grads_i, self._capability_parts, signal, capability_loss)
        if not distributed:
            add_to_grad(params, add_gradients(grads_r, grads_i))
        correction = penalty = None
        if self.accelerator.sync_gradients:  # the window's last micro-batch: AOC decides, once
            self._aoc_window = None
            correction, penalty = self._aoc_correction(module, params, window, differentiable)
        if not distributed:
            if correction is not None:
                add_to_grad(params, correction)
            return capability_loss + (penalty if penalty is not None else 0.0)
        # After the probes (they shift the weights in place): TRL's loss through the wrapper.
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        surrogate = 0.0 if correction is None else \
            sum((p * c.to(p.dtype)).sum() for p, c in zip(params, correction) if c is not None)  # gradient: correction
        self._backward(loss + surrogate)
        return loss.detach() + (penalty if penalty is not None else 0.0)

    def _aoc_correction(self, module, params, window: AOCWindow, differentiable: bool):
        """S_cos of the window and what AOC adds to g_R + g_I (``None`` for nothing), and the penalty."""
        mode, record = self.aoc["mode"], self._step_record
        grads_r, grads_i = window.grads
        self._capability_parts = window.chunks()
        signal = window.signal
        if self._aoc_through_backward:  # global g_R, g_I and signal flags, one collective on every rank
            averaged = average_across_ranks([*zeros_for_none(grads_r, params), *zeros_for_none(grads_i, params),
                                             signal])
            grads_r, grads_i, signal = averaged[:len(params)], averaged[len(params):-1], averaged[-1]
        # One pass over the gradients: the Gramian gives S_cos, both norms and |g_R + g_I|.
        gram = gramian(grads_r, grads_i)
        cosine = cosine_from_gramian(gram, self.aoc["eps"])
        rr, ri, ii = gram.detach().flatten()[[0, 1, 3]].tolist()
        policy_norm = math.sqrt(max(rr + ii + 2 * ri, 0.0))
        no_signal = [name for name, flag in zip(CAPABILITIES, signal.tolist()) if flag == 0]
        if no_signal:
            cosine = torch.tensor(math.nan)
            record["aoc_note"] = f"zero advantages: {', '.join(no_signal)}"
        elif rr == 0.0 or ii == 0.0:
            record["aoc_note"] = "single capability"
        penalty, lam, correction, unit_norm = None, 0.0, None, 0.0
        if mode == "penalty":
            unit_penalty = orthogonality_penalty(cosine, 1.0, self.aoc["tau"])
            if unit_penalty is not None:
                if differentiable:
                    grads_unit = torch.autograd.grad(unit_penalty, params, allow_unused=True)
                else:
                    grads_unit = self._penalty_gradient_fd(module, params, grads_r, grads_i,
                                                           float(cosine.detach()), gram)
                unit_norm = total_norm(grads_unit)
                lam = (dynamic_lambda(self.aoc["lambda"], policy_norm, unit_norm)
                       if self.aoc["lambda_scaling"] == "gradient_norm" else self.aoc["lambda"])
                penalty = (lam * unit_penalty).detach()
                correction = [None if g is None else lam * g.detach() for g in grads_unit]
        elif mode == "project" and not is_nan(cosine):
            # One weighting call per step: GradVac's EMA target must advance once, not twice.
            a, b = self.projector.combination(grads_r, grads_i, gram)
            record["projection_weights"] = [a, b]
            correction = projection_correction(a, b, grads_r, grads_i)
        record.update(s_cos=float(cosine.detach()), l_orth=float(penalty) if penalty is not None else 0.0,
                      aoc_lambda=lam, aoc_fired=penalty is not None, grad_norm_medical=math.sqrt(rr),
                      grad_norm_instruction=math.sqrt(ii), grad_norm_penalty=lam * unit_norm)
        return correction, penalty

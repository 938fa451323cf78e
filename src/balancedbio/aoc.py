"""Active Orthogonality Control (section 4.2, eqs. 4-6), independent of any trainer.

Gradients are lists of tensors (one per trainable parameter, ``None`` for a parameter the loss
does not reach), so nothing is flattened into one huge vector.

- ``gradient_cosine``: eq. 5, S_cos = g_R . g_I / (|g_R| |g_I| + eps). When either gradient is
  exactly zero (a batch whose groups all had zero reward variance has zero advantages, hence
  a zero policy gradient) the cosine is *undefined*: it returns NaN, never 0, and no penalty
  or projection is applied.
- ``orthogonality_penalty``: eq. 6, L_orth = lambda * 1(|S_cos| > tau) * S_cos^2. Its gradient
  really enters the update, either exactly (``penalty_gradient: exact``: gradients taken with
  ``create_graph=True``, then a double backward) or through two finite-difference
  Hessian-vector products (``finite_difference``, see ``cosine_gradient_directions``): the
  double backward cannot use fused attention or TRL's fused log-prob kernel, which costs
  ~10x the memory on the embedded model and does not scale to 2048-token sequences.
- ``dynamic_lambda``: the paper calls lambda "a dynamic scaling factor" without a formula;
  here lambda_t = lambda * min(1, |g_R + g_I| / |grad S_cos^2|) (``lambda_scaling:
  gradient_norm``, the default) or lambda itself (``constant``): see the function.
- ``project``: PCGrad or GradVac from torchjd. Both are Gramian-based, so the 2x2 Gramian of
  (g_R, g_I) is computed here from per-parameter dot products and torchjd returns the two
  combination weights; the combined gradient is a g_R + b g_I, parameter by parameter.
- ``average_across_ranks``: data parallel. Each rank's g_R and g_I come from its own slice of
  the batch; S_cos of the *global* batch needs their rank average (what DDP applies), in one
  collective that every rank calls.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Gradients = Sequence[torch.Tensor | None]


def _dot(a: Gradients, b: Gradients) -> torch.Tensor:
    total = None
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        term = (x.float() * y.float()).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def add_gradients(a: Gradients, b: Gradients) -> list[torch.Tensor | None]:
    """a + b parameter by parameter, a ``None`` entry counting as zero (``None`` where both are)."""
    return [y if x is None else (x if y is None else x + y) for x, y in zip(a, b)]


def average_across_ranks(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The rank average of each tensor, in float32, with one all-reduce of a flat buffer.

    Every rank must call it with the same shapes in the same order (a collective). Without an
    initialised process group, or with one rank, it returns the tensors in float32.
    """
    import torch.distributed as dist

    tensors = list(tensors)
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [t.detach().float() for t in tensors]
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def gramian(g_r: Gradients, g_i: Gradients) -> torch.Tensor:
    rr, ii, ri = _dot(g_r, g_r), _dot(g_i, g_i), _dot(g_r, g_i)
    return torch.stack([torch.stack([rr, ri]), torch.stack([ri, ii])])


def cosine_from_gramian(gram: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 5 from the 2x2 Gramian [[|g_R|^2, g_R.g_I], [g_R.g_I, |g_I|^2]]; NaN if a gradient is 0."""
    norm_r, norm_i = gram[0, 0].sqrt(), gram[1, 1].sqrt()
    if float(norm_r.detach()) == 0.0 or float(norm_i.detach()) == 0.0:
        return torch.tensor(math.nan)
    return gram[0, 1] / (norm_r * norm_i + eps)


def gradient_cosine(g_r: Gradients, g_i: Gradients, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 5; differentiable when the gradients were built with ``create_graph=True``."""
    return cosine_from_gramian(gramian(g_r, g_i), eps)


def cosine_gradient_directions(g_r: Gradients, g_i: Gradients, cosine: float, gram: torch.Tensor | None = None
                               ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """(v_R, v_I) with grad_theta S_cos = H_R v_R + H_I v_I (H_* the Hessians of the two losses).

    From S = g_R.g_I / (|g_R||g_I|): dS/dg_R = g_I/(|g_R||g_I|) - S g_R/|g_R|^2 (and symmetrically),
    and dg_R/dtheta = H_R. Two Hessian-vector products then give the penalty's exact gradient
    direction; ``finite_difference`` mode approximates them with one extra gradient each.
    """
    gram = gramian(g_r, g_i) if gram is None else gram
    norm_r, norm_i = float(gram[0, 0].detach().sqrt()), float(gram[1, 1].detach().sqrt())
    v_r, v_i = [], []
    for a, b in zip(g_r, g_i):
        if a is None and b is None:
            v_r.append(None)
            v_i.append(None)
            continue
        a = a.detach() if a is not None else torch.zeros_like(b)
        b = b.detach() if b is not None else torch.zeros_like(a)
        v_r.append(b / (norm_r * norm_i) - cosine * a / norm_r ** 2)
        v_i.append(a / (norm_r * norm_i) - cosine * b / norm_i ** 2)
    return v_r, v_i


def dynamic_lambda(lam: float, policy_grad_norm: float, penalty_grad_norm: float) -> float:
    """lambda_t = lambda * min(1, |g_R + g_I| / |grad S_cos^2|).

    The gradient of S_cos^2 scales like 1 / (|g_R| |g_I|): when one task's gradient is tiny the
    cosine is hypersensitive and an unscaled penalty would swamp the policy update. With this
    factor the penalty's own gradient is never longer than lambda times the policy gradient, so
    lambda reads as "at most this fraction of the step goes to decoupling the capabilities".
    """
    if penalty_grad_norm <= 0 or not math.isfinite(penalty_grad_norm):
        return 0.0
    return lam * min(1.0, policy_grad_norm / penalty_grad_norm)


def orthogonality_penalty(cosine: torch.Tensor, lam: float, tau: float) -> torch.Tensor | None:
    """Eq. 6; ``None`` when the indicator is off or the cosine is undefined."""
    if torch.isnan(cosine) or abs(float(cosine.detach())) <= tau or lam == 0:
        return None
    return lam * cosine.abs() ** 2


class Projector:
    """PCGrad or GradVac (torchjd) for two task gradients; GradVac keeps its EMA target."""

    def __init__(self, method: str = "pcgrad", gradvac_beta: float = 0.01):
        from torchjd.aggregation import GradVac, PCGrad

        if method == "pcgrad":
            self.aggregator = PCGrad()
        elif method == "gradvac":
            self.aggregator = GradVac(beta=gradvac_beta)
        else:
            raise ValueError(f"unknown projection {method!r}: expected pcgrad or gradvac")
        self.method = method

    def combination(self, g_r: Gradients, g_i: Gradients, gram: torch.Tensor | None = None) -> tuple[float, float]:
        gram = gramian(g_r, g_i) if gram is None else gram
        coefficients = self.aggregator.gramian_weighting(gram.detach().double())
        return float(coefficients[0]), float(coefficients[1])

    def combine(self, g_r: Gradients, g_i: Gradients, gram: torch.Tensor | None = None
                ) -> list[torch.Tensor | None]:
        return self.apply(self.combination(g_r, g_i, gram), g_r, g_i)

    @staticmethod
    def apply(coefficients: tuple[float, float], g_r: Gradients, g_i: Gradients) -> list[torch.Tensor | None]:
        """a g_R + b g_I, parameter by parameter."""
        a, b = coefficients
        out = []
        for x, y in zip(g_r, g_i):
            if x is None and y is None:
                out.append(None)
            else:
                out.append(a * (x if x is not None else 0) + b * (y if y is not None else 0))
        return out


def pcgrad_reference(g_r: torch.Tensor, g_i: torch.Tensor) -> torch.Tensor:
    """Yu et al. 2020 for two flat gradients, written out (used to test the torchjd path)."""
    out_r, out_i = g_r.clone(), g_i.clone()
    dot = torch.dot(g_r, g_i)
    if dot < 0:
        out_r = g_r - dot / torch.dot(g_i, g_i) * g_i
        out_i = g_i - dot / torch.dot(g_r, g_r) * g_r
    return out_r + out_i

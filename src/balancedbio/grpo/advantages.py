"""Eq. 11's advantages: each reward component centred in its group and scaled on its own, then weighted."""

from __future__ import annotations

import torch


ADVANTAGE_AGGREGATIONS = ("weighted_components", "sum_then_normalize", "normalize_then_sum")


def weighted_component_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
                                  std_floor: float) -> torch.Tensor:
    """Eq. 11's advantages, A = sum_k w_k A_k, for a (rows, K) reward matrix (NaN = not applicable).

    A_k is R_k minus its group mean over the group's rows where R_k applies, divided by
    max(std of those centred values over the whole batch, ``std_floor``); a component that does
    not apply to a row adds 0 to it. Because the scale of A_k does not depend on w_k, raising w_k
    raises the share of the update that component k's rows get, unlike group-normalising
    sum_k w_k R_k, where a weight cancels in any group in which only its component varies.
    """
    rewards = rewards_per_func.to(torch.float32)
    rows, components = rewards.shape
    if rows % num_generations:
        raise ValueError(f"{rows} completions do not split into groups of {num_generations}")
    applies = ~torch.isnan(rewards)
    grouped = torch.where(applies, rewards, 0.0).view(-1, num_generations, components)
    counts = applies.view(-1, num_generations, components).sum(dim=1, keepdim=True)
    means = grouped.sum(dim=1, keepdim=True) / counts.clamp(min=1)
    centred = torch.where(applies, (grouped - means).view(rows, components), 0.0)
    # Batch-level scale of each component: the root mean square of its centred values (their mean is 0).
    scale = (centred.pow(2).sum(dim=0) / applies.sum(dim=0).clamp(min=1)).sqrt().clamp(min=std_floor)
    return (centred / scale * weights.to(centred.device, torch.float32)).sum(dim=1)



def _instruction_share(advantages: torch.Tensor, instruction: torch.Tensor) -> float | None:
    """Share of sum |A| on the instruction rows (None when no row has an advantage)."""
    magnitude = advantages.abs().reshape(advantages.shape[0], -1).sum(dim=1).to(instruction.device)
    total = float(magnitude.sum())
    return float(magnitude[instruction].sum()) / total if total > 0 else None


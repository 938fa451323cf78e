"""Stratified batches (appendix B): every generation batch, and every device's slice of it, holds both capabilities."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.utils.data import Sampler

CAPABILITIES = ("medical", "instruction")


class StratifiedRepeatSampler(Sampler):
    """TRL's ``RepeatSampler`` contract, with every batch interleaving the capabilities.

    Each batch of ``batch_size`` distinct prompts takes them round-robin from the per-capability
    pools (medical, instruction, medical, ...), each pool walked in its own shuffled order and
    reshuffled when exhausted, so the smaller pool is cycled rather than starving the batch.
    Every prompt is yielded ``mini_repeat_count`` times in a row (the G completions) and each
    batch ``repeat_count`` times (reuse over iterations), exactly as TRL expects.
    """

    def __init__(self, capabilities: Sequence[str], batch_size: int, mini_repeat_count: int = 1,
                 repeat_count: int = 1, shuffle: bool = True, seed: int | None = None):
        pools: dict[str, list[int]] = {}
        for index, capability in enumerate(capabilities):
            pools.setdefault(capability, []).append(index)
        order = {name: i for i, name in enumerate(CAPABILITIES)}
        self.pools = [pools[name] for name in sorted(pools, key=lambda c: (order.get(c, len(order)), c))]
        if len(self.pools) > 1 and batch_size < len(self.pools):
            raise ValueError(f"a batch of {batch_size} prompt(s) cannot hold all {len(self.pools)} capabilities "
                             f"({', '.join(sorted(pools))}); raise grpo.prompts_per_step")
        self.batch_size, self.mini_repeat_count, self.repeat_count = batch_size, mini_repeat_count, repeat_count
        self.shuffle = shuffle
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        largest = max(len(pool) for pool in self.pools)
        self.num_batches = max(1, math.ceil(largest * len(self.pools) / batch_size))

    def _walk(self, pool: list[int]):
        while True:
            order = torch.randperm(len(pool), generator=self.generator).tolist() if self.shuffle else range(len(pool))
            for i in order:
                yield pool[i]

    def __iter__(self):
        walkers = [self._walk(pool) for pool in self.pools]
        for _ in range(self.num_batches):
            chunk = [next(walkers[i % len(walkers)]) for i in range(self.batch_size)]
            for _ in range(self.repeat_count):
                for index in chunk:
                    for _ in range(self.mini_repeat_count):
                        yield index

    def __len__(self) -> int:
        return self.num_batches * self.batch_size * self.mini_repeat_count * self.repeat_count

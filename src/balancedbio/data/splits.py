"""Entity splits of MKGSG: train/val/test by a seeded hash, and the train split's three uses (PRM/SFT/GRPO)."""

from __future__ import annotations

import hashlib




SPLITS = ("train", "val", "test")
USES = ("prm", "sft", "grpo")  # the three disjoint parts of the train split
MIN_TERM_DEPTH = 4  # skip vague phenotypes such as "Abnormality of the nervous system"


def _unit_interval(entity: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{entity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def entity_split(entity: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of an entity: the same entity lands in the same split every run."""
    u = _unit_interval(entity, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def entity_use(entity: str, seed: int, val_fraction: float, test_fraction: float,
               use_fractions: dict[str, float]) -> str:
    """Which use (PRM / SFT / GRPO) a train entity serves: the rest of its hash interval, cut
    in proportion to ``use_fractions`` (one hash, so the val/test assignment is unchanged)."""
    train_start = test_fraction + val_fraction
    v = (_unit_interval(entity, seed) - train_start) / (1.0 - train_start)
    total = sum(use_fractions[u] for u in USES)
    edge = 0.0
    for use in USES[:-1]:
        edge += use_fractions[use] / total
        if v < edge:
            return use
    return USES[-1]


def partition_label(split: str, use: str | None) -> str:
    return f"{split}:{use}" if use else split


def parse_partition(label: str) -> tuple[str, str | None]:
    split, _, use = label.partition(":")
    return split, use or None



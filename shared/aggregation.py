"""Aggregating item updates: per-device clipping into partial sums that compose across processes.

The server (or, in a sharded simulation, each shard for its own devices) adds every accepted
device update, clipped to the configured bound, into a float64 partial sum; partial sums merge
by addition, and the mean is taken once, over every contributing device (uniform weights:
weighting by example counts would need devices to reveal their data size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Delta = tuple[np.ndarray, np.ndarray]  # (embedding [n, d], bias [n])


def delta_norm(delta: Delta) -> float:
    return float(np.sqrt(np.sum(delta[0].astype(np.float64) ** 2) + np.sum(delta[1].astype(np.float64) ** 2)))


def clip_delta(delta: Delta, bound: float) -> tuple[Delta, bool]:
    """Scale a device's whole update (embeddings and biases together) down to L2 norm `bound` (0: no clip)."""
    if bound <= 0:
        return delta, False
    norm = delta_norm(delta)
    if norm <= bound:
        return delta, False
    factor = bound / norm
    return ((delta[0] * factor).astype(np.float32), (delta[1] * factor).astype(np.float32)), True


@dataclass
class PartialSum:
    embedding: np.ndarray  # float64 [n, d]
    bias: np.ndarray  # float64 [n]
    count: int = 0
    clipped: int = 0

    @classmethod
    def zeros(cls, num_items: int, dim: int) -> PartialSum:
        return cls(np.zeros((num_items, dim)), np.zeros(num_items))

    def add(self, delta: Delta, *, clip: float) -> None:
        delta, was_clipped = clip_delta(delta, clip)
        self.embedding += delta[0]
        self.bias += delta[1]
        self.count += 1
        self.clipped += int(was_clipped)

    def merge(self, other: PartialSum) -> None:
        self.embedding += other.embedding
        self.bias += other.bias
        self.count += other.count
        self.clipped += other.clipped

    def mean(self) -> Delta:
        return ((self.embedding / self.count).astype(np.float32), (self.bias / self.count).astype(np.float32))

"""The trained head of the catalogue: the items that get trained embeddings, chosen from the noisy prior alone.

Every coordinate of a secure sum (and every parameter of a DP-SGD step) carries the full noise, while the
signal sits on the items many devices hold. So training is restricted to a head of the catalogue, chosen as a
deterministic function of the noisy popularity sum the devices already released (post-processing: no new
release, no true count used) and of public settings. The rest of the catalogue stays rankable by what is known of
it: its prior bias and, where the public catalogue has categories, the mean trained embedding of its category.

Rule ('auto'): the items whose noisy count is at least `z` standard deviations of the sum's noise (few items
held by nobody pass: at z = 3, about 0.13% of them), and at least MIN_HEAD items (the top ones by noisy count).
An integer N: the N items with the largest noisy counts. Ties go to the lower item id. Without a prior
(popularity-prior = false) or without noise (no DP and every item counted), nothing is known to choose from,
and every item trains.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_HEAD = 10


@dataclass(frozen=True)
class NoisyPrior:
    """The released popularity sum (noisy, one entry per item) and the std of its noise per item."""

    counts: np.ndarray  # float64 [num_items]
    noise_std: float
    reports: int


def select_head(prior: NoisyPrior | None, num_items: int, *, size: int | None, z: float) -> np.ndarray | None:
    """The sorted item ids that train (None: all of them). `size`: None for the 'auto' rule, else the top-N count
    (0 = all items)."""
    if prior is None or num_items <= 0 or size == 0:
        return None
    counts = np.asarray(prior.counts, dtype=np.float64)
    if counts.shape != (num_items,):
        raise ValueError(f"noisy prior: {counts.shape[0]} counts for {num_items} items")
    order = np.lexsort((np.arange(num_items), -counts))  # by count, descending; ties by id
    if size is None:
        cut = z * prior.noise_std if prior.noise_std > 0 else np.nextafter(0.0, 1.0)
        size = max(MIN_HEAD, int(np.sum(counts >= cut)))
    if size >= num_items:
        return None
    return np.sort(order[:size]).astype(np.int64)


def head_digest(head: np.ndarray | None) -> str:
    """SHA-256 of the head's ids (int64 little-endian); '' for the whole catalogue."""
    if head is None:
        return ""
    return hashlib.sha256(np.ascontiguousarray(head, dtype="<i8").tobytes()).hexdigest()


def check_head(head: np.ndarray, *, size: int, digest: str, num_items: int) -> np.ndarray:
    """A received head, checked against the plan that names it: int64, strictly increasing ids in the catalogue,
    `size` of them, with the plan's digest (which a secure sum's members sign). Raises ValueError."""
    if head.ndim != 1 or head.dtype != np.int64:
        raise ValueError(f"head: expected int64 [n], got {head.dtype}{list(head.shape)}")
    if len(head) != size or size < 1:
        raise ValueError(f"head: {len(head)} items, the plan names {size}")
    if head[0] < 0 or head[-1] >= num_items or not np.all(np.diff(head) > 0):
        raise ValueError(f"head: ids must be strictly increasing within [0, {num_items})")
    if head_digest(head) != digest:
        raise ValueError("head: its digest differs from the plan's head-sha256")
    return head


def local_index(head: np.ndarray, num_items: int) -> np.ndarray:
    """Catalogue id -> position in the head (-1 outside it)."""
    index = np.full(num_items, -1, dtype=np.int64)
    index[head] = np.arange(len(head))
    return index


def fill_tail(embedding: np.ndarray, head: np.ndarray | None, categories: Sequence[str] | None) -> np.ndarray:
    """Embeddings for ranking: the head's rows as trained; every other row the mean trained row of the head items that
    share one of its public categories (zero where none does, or without categories), so a tail item ranks by its
    prior bias and by how the user relates to its category. (Measured on MovieLens latest-small, user level, epsilon
    8, the same trained tables: HR@10 0.0475 with category rows, 0.0295 with zero rows, 0.0230 with the untrained
    initial rows; docs/results.md.)"""
    if head is None:
        return embedding
    out = np.zeros_like(embedding)
    out[head] = embedding[head]
    if not categories:
        return out
    in_head = np.zeros(len(embedding), dtype=bool)
    in_head[head] = True
    labels = [[c for c in str(cats).split("|") if c] for cats in categories]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for i in head:
        for c in labels[i]:
            sums[c] = sums.get(c, 0.0) + embedding[i].astype(np.float64)
            counts[c] = counts.get(c, 0) + 1
    means = {c: sums[c] / counts[c] for c in sums}
    for i in np.flatnonzero(~in_head):
        known = [means[c] for c in labels[i] if c in means]
        if known:
            out[i] = np.mean(known, axis=0)
    return out

"""Ranking metrics: full ranking over unseen items (headline) and the sampled 99-negative protocol.

Ties are resolved by expectation over a uniformly random tie-break, so a model that
scores many items equally (popularity, random) is neither rewarded nor punished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .data.interactions import DeviceSplit

HR_K, NDCG_K, RECALL_K, COVERAGE_K = 10, 10, 20, 10
METRIC_KEYS = ("hr@10", "ndcg@10", "recall@20", "coverage@10")
DEVICE_METRIC_KEYS = ("hr@10", "ndcg@10", "recall@20")
SAMPLED_NEGATIVES = 99
_DISCOUNT_CUMSUM = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(NDCG_K) + 2.0))])


def _tie_aware_hits(greater: np.ndarray, equal: np.ndarray, k: int) -> np.ndarray:
    """P(rank < k) when the target ties with `equal` other items and `greater` items beat it."""
    return np.clip(k - greater, 0, equal + 1) / (equal + 1)


def _tie_aware_ndcg(greater: np.ndarray, equal: np.ndarray) -> np.ndarray:
    lo = np.minimum(greater, NDCG_K)
    hi = np.minimum(greater + equal + 1, NDCG_K)
    return (_DISCOUNT_CUMSUM[hi] - _DISCOUNT_CUMSUM[lo]) / (equal + 1)


def _target_and_mask(split: DeviceSplit, target: str) -> tuple[int, np.ndarray]:
    if target == "test":
        return split.test_item, split.seen_items
    if target == "val":
        return split.val_item, split.train_items
    raise ValueError(f"target must be 'test' or 'val', got {target!r}")


def rank_scores(scores: np.ndarray, splits: Sequence[DeviceSplit], *, target: str = "test",
                sampled_seed: int | None = None) -> dict[str, np.ndarray]:
    """Per-device metrics for a block of devices; `scores` is [len(splits), num_items]."""
    scores = np.array(scores, dtype=np.float64, copy=True)
    rows = np.arange(len(splits))
    targets = np.empty(len(splits), dtype=np.int64)
    for r, split in enumerate(splits):
        targets[r], seen = _target_and_mask(split, target)
        scores[r, seen] = -np.inf  # never recommend what the device already has
    t = scores[rows, targets][:, None]
    greater = (scores > t).sum(axis=1)
    equal = (scores == t).sum(axis=1) - 1
    top = np.argpartition(-scores, min(COVERAGE_K, scores.shape[1]) - 1, axis=1)[:, :COVERAGE_K]
    top = np.where(np.isfinite(np.take_along_axis(scores, top, axis=1)), top, -1)  # -1: fewer unseen items than K
    out = {
        "hr@10": _tie_aware_hits(greater, equal, HR_K),
        "ndcg@10": _tie_aware_ndcg(greater, equal),
        "recall@20": _tie_aware_hits(greater, equal, RECALL_K),  # one held-out item: recall@K = HR@K
        "top10": top,
    }
    if sampled_seed is not None:
        out.update(_sampled_protocol(scores, targets, splits, sampled_seed))
    return out


def _sampled_protocol(scores: np.ndarray, targets: np.ndarray, splits: Sequence[DeviceSplit],
                      seed: int) -> dict[str, np.ndarray]:
    """Rank the held-out item among 99 random unseen items (only for comparison with papers)."""
    hr, ndcg = np.zeros(len(splits)), np.zeros(len(splits))
    for r, split in enumerate(splits):
        rng = np.random.default_rng([seed, int(targets[r]), len(split.train_items)])
        pool = np.flatnonzero(np.isfinite(scores[r]))
        pool = pool[pool != targets[r]]
        negatives = rng.choice(pool, size=min(SAMPLED_NEGATIVES, len(pool)), replace=False)
        t = scores[r, targets[r]]
        neg = scores[r, negatives]
        g, e = np.array([(neg > t).sum()]), np.array([(neg == t).sum()])
        hr[r] = _tie_aware_hits(g, e, HR_K)[0]
        ndcg[r] = _tie_aware_ndcg(g, e)[0]
    return {"sampled_hr@10": hr, "sampled_ndcg@10": ndcg}


class CategoryDiversity:
    """Intra-list diversity of top-10 lists: mean over item pairs of 1 - Jaccard(categories), per list.

    Categories come from the public catalogue ('|'-separated labels, as in MovieLens genres).
    """

    def __init__(self, categories: Sequence[str]) -> None:
        labels = [frozenset(c for c in str(item).split("|") if c) for item in categories]
        names = sorted({c for item in labels for c in item})
        index = {name: k for k, name in enumerate(names)}
        self.onehot = np.zeros((len(labels), len(names)), dtype=np.float32)
        for i, item in enumerate(labels):
            self.onehot[i, [index[c] for c in item]] = 1.0
        self.known = self.onehot.sum(axis=1) > 0

    def of_lists(self, top: np.ndarray) -> np.ndarray:
        """Per list (rows of item indices, -1 = empty slot): mean pairwise category distance."""
        out = np.zeros(len(top))
        for r, row in enumerate(top):
            items = row[(row >= 0)]
            items = items[self.known[items]]
            if len(items) < 2:
                continue
            onehot = self.onehot[items]
            inter = onehot @ onehot.T
            sizes = onehot.sum(axis=1)
            jaccard = inter / (sizes[:, None] + sizes[None, :] - inter)
            pairs = np.triu_indices(len(items), k=1)
            out[r] = float(np.mean(1.0 - jaccard[pairs]))
        return out


def evaluate_population(score_block: Callable[[np.ndarray], np.ndarray], splits: Sequence[DeviceSplit],
                        num_items: int, *, target: str = "test", sampled_seed: int | None = 0,
                        block_size: int = 512, diversity: CategoryDiversity | None = None) -> dict[str, float]:
    """Mean metrics over all devices; `score_block(device_indices)` returns their score rows."""
    sums: dict[str, float] = {}
    recommended = np.zeros(num_items, dtype=bool)
    for start in range(0, len(splits), block_size):
        idx = np.arange(start, min(start + block_size, len(splits)))
        block = rank_scores(score_block(idx), [splits[i] for i in idx], target=target, sampled_seed=sampled_seed)
        top = block.pop("top10")
        if diversity is not None:
            block["diversity@10"] = diversity.of_lists(top)
        top = top.ravel()
        recommended[top[top >= 0]] = True
        for key, values in block.items():
            sums[key] = sums.get(key, 0.0) + float(values.sum())
    n = max(len(splits), 1)
    result = {key: value / n for key, value in sums.items()}
    result["coverage@10"] = float(recommended.mean())
    return {key: result[key] for key in (*METRIC_KEYS, *sorted(set(result) - set(METRIC_KEYS)))}

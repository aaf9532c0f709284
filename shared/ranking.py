"""On-device ranking: re-fit the user row to the received item model, then rank unseen items.

The re-fitted row maximises the full-softmax likelihood of the device's own training
items under the global item model, ``sum_i w_i log softmax(Q p + b)_i - (l2/2) |p|^2``,
a concave problem solved by Newton's method. It is used only for ranking on the device:
it never leaves the device and never feeds a training update, so it costs no privacy.
"""

from __future__ import annotations

import numpy as np

from .data.interactions import DeviceSplit
from .evaluation import CategoryDiversity, evaluate_population
from .model import ItemTables

MAX_NEWTON_STEPS = 25
NEWTON_TOLERANCE = 1e-6


def refit_user_row(tables: ItemTables, items: np.ndarray, weights: np.ndarray, *, l2: float) -> np.ndarray:
    q = tables.embedding.astype(np.float64)
    b = tables.bias.astype(np.float64)
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    target = w @ q[items]
    p = np.zeros(q.shape[1])
    eye = np.eye(q.shape[1])
    for _ in range(MAX_NEWTON_STEPS):
        logits = q @ p + b
        pi = np.exp(logits - logits.max())
        pi /= pi.sum()
        mean = pi @ q
        gradient = target - total * mean - l2 * p
        hessian = total * ((q * pi[:, None]).T @ q - np.outer(mean, mean)) + l2 * eye
        step = np.linalg.solve(hessian, gradient)
        p += step
        if np.linalg.norm(step) < NEWTON_TOLERANCE:
            break
    return p.astype(np.float32)


def refit_user_rows(tables: ItemTables, splits: list[DeviceSplit], *, l2: float) -> np.ndarray:
    return np.stack([refit_user_row(tables, s.train_items, s.train_weights, l2=l2) for s in splits])


def evaluate_with_refit(tables: ItemTables, splits: list[DeviceSplit], num_items: int, *, l2: float,
                        sampled_seed: int | None = 0, diversity: CategoryDiversity | None = None) -> dict[str, float]:
    """Every device ranks with its on-device re-fit row, as it would itself; metrics averaged over devices."""
    rows = refit_user_rows(tables, splits, l2=l2)
    return evaluate_population(lambda idx: tables.scores(rows[idx]), splits, num_items, sampled_seed=sampled_seed,
                               diversity=diversity)


def top_k(tables: ItemTables, user_row: np.ndarray, *, exclude: np.ndarray, k: int) -> np.ndarray:
    """The k best-scoring items the user does not already have, best first."""
    scores = tables.scores(user_row[None])[0].astype(np.float64)
    scores[exclude] = -np.inf
    k = min(k, int(np.isfinite(scores).sum()))
    best = np.argpartition(-scores, k - 1)[:k] if k else np.array([], dtype=np.int64)
    return best[np.argsort(-scores[best], kind="stable")]

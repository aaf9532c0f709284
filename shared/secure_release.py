"""What a device puts into a secure sum in the distributed and user modes (numpy only: no torch, no Flower).

The vector is the item-embedding delta, plus the item-bias delta when biases train, flattened.
- distributed (record level): one DP-SGD item step clipped per example and without noise, so the
  vector is lr x the sum of clipped example gradients: sensitivity lr x C;
- user (user level): the whole item update is clipped to S = update-clip: sensitivity S (a device
  joining or leaving the sum moves it by at most S);
- the popularity report: the item indicator (record level: one (device, item) pair moves one entry
  by at most 1; user level: the indicator scaled into the unit ball).
Noise: shared/distributed_dp.py, 1/(t_min - c) of the sum's variance per device.
"""

from __future__ import annotations

import numpy as np

from .distributed_dp import SumMechanism
from .plans import LocalTrainingPlan
from .popularity import PopularityPlan


def update_dimension(plan: LocalTrainingPlan, num_items: int, dim: int) -> int:
    """Coordinates of one update: the trained rows (the plan's head, or all `num_items`) x (dim + bias)."""
    return plan.trained_items(num_items) * (dim + (1 if plan.train_biases else 0))


def training_mechanism(plan: LocalTrainingPlan, num_items: int, dim: int, t_min: int,
                       colluders: int = 0) -> SumMechanism:
    sensitivity = plan.update_clip if plan.privacy == "user" else plan.lr * plan.clip_norm
    return SumMechanism(sensitivity=sensitivity, noise_multiplier=plan.noise_multiplier, t_min=t_min,
                        dimension=update_dimension(plan, num_items, dim), colluders=colluders)


def popularity_mechanism(plan: PopularityPlan, num_items: int, t_min: int, colluders: int = 0) -> SumMechanism:
    return SumMechanism(sensitivity=1.0, noise_multiplier=plan.noise_multiplier, t_min=t_min, dimension=num_items,
                        colluders=colluders)


def update_vector(plan: LocalTrainingPlan, embedding_delta: np.ndarray, bias_delta: np.ndarray) -> np.ndarray:
    """The flattened update a device sums (user mode: clipped as a whole to S)."""
    parts = [np.asarray(embedding_delta, dtype=np.float64).ravel()]
    if plan.train_biases:
        # The biases train as raw parameters times bias-scale: the clipped step moves the raw ones, so those go on
        # the grid (sensitivity lr x C); the server scales the decoded sum back (split_update).
        parts.append(np.asarray(bias_delta, dtype=np.float64).ravel() / plan.bias_scale)
    vector = np.concatenate(parts)
    if plan.privacy == "user":
        norm = float(np.linalg.norm(vector))
        if norm > plan.update_clip:
            vector *= plan.update_clip / norm
    return vector


def split_update(plan: LocalTrainingPlan, vector: np.ndarray, num_items: int,
                 dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A decoded (summed) vector back to (embedding [n, d], bias [n]) deltas (bias zeros if biases do not train), n the
    rows the plan trains."""
    num_items = plan.trained_items(num_items)
    embedding = vector[: num_items * dim].reshape(num_items, dim)
    bias = vector[num_items * dim:] * plan.bias_scale if plan.train_biases else np.zeros(num_items)
    return embedding.astype(np.float64), np.asarray(bias, dtype=np.float64)

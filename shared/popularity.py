"""A private estimate of item popularity, reported once by every device before training.

A device reports its item indicator (1 for each distinct item it has, weights clipped to
[0, 1]) plus N(0, sigma^2) noise on every entry. Adding or removing one (device, item) pair changes
one entry by at most 1, so this is a Gaussian mechanism with L2 sensitivity 1: the same RDP
as one DP-SGD step at (sigma, q=1), and it enters the device's history as exactly that.
The server sums the reports; log counts become the item biases (popularity prior).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .plans import MAX_NOISE_MULTIPLIER, PlanError, plan_from_config
from .privacy.accounting import HistoryEntry


@dataclass(frozen=True)
class PopularityPlan:
    server_round: int  # 0: before the first training round
    dp: bool
    noise_multiplier: float
    delta: float
    privacy: str = "local"  # distributed/user: a secure sum of quantised reports, each with 1/t of the noise

    def __post_init__(self) -> None:
        if (self.dp and not self.noise_multiplier > 0) or not 0 <= self.noise_multiplier <= MAX_NOISE_MULTIPLIER:
            raise PlanError(f"popularity plan: noise_multiplier={self.noise_multiplier!r} out of range")
        if not 0 < self.delta < 1:
            raise PlanError(f"popularity plan: delta={self.delta!r} is out of range")
        if self.privacy not in ("local", "distributed", "user"):
            raise PlanError(f"popularity plan: privacy={self.privacy!r} is not local, distributed or user")

    def privacy_steps(self) -> list[HistoryEntry]:
        return [(self.noise_multiplier, 1.0, 1)] if self.dp else []

    def to_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PopularityPlan:
        return plan_from_config(cls, config)


def indicator(items: np.ndarray, weights: np.ndarray, num_items: int, *, unit_norm: bool = False) -> np.ndarray:
    """The item indicator (weights clipped to [0, 1]); `unit_norm`: scaled into the L2 unit ball, so the whole
    report of a device has sensitivity 1 (user-level)."""
    out = np.zeros(num_items, dtype=np.float64)
    np.maximum.at(out, items, np.clip(weights, 0.0, 1.0))
    if unit_norm:
        out /= max(1.0, float(np.linalg.norm(out)))
    return out


def noisy_indicator(items: np.ndarray, weights: np.ndarray, num_items: int, *, plan: PopularityPlan,
                    seed: int) -> np.ndarray:
    report = indicator(items, weights, num_items)
    if plan.dp:
        report += np.random.default_rng(seed).normal(0.0, plan.noise_multiplier, size=num_items)
    return report.astype(np.float32)


def biases_from_counts(total: np.ndarray, *, reports: int, noise_multiplier: float) -> np.ndarray:
    """Centred log counts, smoothed by the noise level of the sum (post-processing: no privacy cost)."""
    smoothing = max(1.0, noise_multiplier * np.sqrt(max(reports, 1)))
    logs = np.log(np.maximum(total.astype(np.float64), 0.0) + smoothing)
    return (logs - logs.mean()).astype(np.float32)

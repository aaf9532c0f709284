"""A device's evaluation release: its ranking metrics on its own held-out items, clamped and Gaussian-noised.

Each released metric lies in [0, 1] after clamping, so changing the device's data in any way
(one interaction more or less moves the re-fitted row and the held-out item arbitrarily) moves
the vector of m metrics by at most sqrt(m) in L2. Adding N(0, (sigma sqrt(m))^2) to each is the
Gaussian mechanism with noise multiplier sigma (Dwork and Roth 2014, Thm A.1; Mironov 2017 for
its RDP): the device's accountant charges it as one step at (sigma, q = 1), like the popularity
report. The re-fitted user row itself is never released.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .evaluation import DEVICE_METRIC_KEYS
from .privacy.accounting import HistoryEntry
from .training import PlanError, plan_from_config

RELEASED_METRICS = DEVICE_METRIC_KEYS  # hr@10, ndcg@10, recall@20; the sampled protocol stays central


@dataclass(frozen=True)
class EvaluationPlan:
    """What the server fixes for one evaluation release; the device holds it to its own policy first."""

    server_round: int
    dp: bool
    noise_multiplier: float
    delta: float
    refit_l2: float

    def __post_init__(self) -> None:
        if self.dp and not self.noise_multiplier > 0:
            raise PlanError(f"evaluation plan: noise_multiplier={self.noise_multiplier!r} must be > 0 with DP")
        if not 0 < self.delta < 1 or not self.refit_l2 > 0 or self.server_round < 0:
            raise PlanError("evaluation plan: delta, refit-l2 or server-round out of range")

    def privacy_steps(self) -> list[HistoryEntry]:
        return [(self.noise_multiplier, 1.0, 1)] if self.dp else []

    @property
    def metric_std(self) -> float:
        """Standard deviation of the noise on each released metric."""
        return self.noise_multiplier * math.sqrt(len(RELEASED_METRICS)) if self.dp else 0.0

    def to_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EvaluationPlan:
        return plan_from_config(cls, config)


def noisy_metrics(metrics: dict[str, float], plan: EvaluationPlan, rng: np.random.Generator) -> dict[str, float]:
    """The released metrics: each clamped to [0, 1] (the sensitivity bound), plus N(0, metric_std^2)."""
    values = np.clip(np.array([metrics[k] for k in RELEASED_METRICS], dtype=np.float64), 0.0, 1.0)
    if plan.dp:
        values = values + rng.normal(0.0, plan.metric_std, size=values.shape)
    return {k: float(v) for k, v in zip(RELEASED_METRICS, values)}

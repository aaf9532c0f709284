"""A device's evaluation release: its ranking metrics on its own held-out items, clamped and Gaussian-noised.

Each released metric lies in [0, 1] after clamping, so changing the device's data in any way
(one item more or less moves the re-fitted row and the held-out item arbitrarily) moves
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
from .plans import MAX_NOISE_MULTIPLIER, PlanError, plan_from_config
from .privacy.accounting import HistoryEntry

RELEASED_METRICS = DEVICE_METRIC_KEYS  # hr@10, ndcg@10, recall@20; the sampled protocol stays central
REFIT_L2_RANGE = (1e-3, 1e6)  # a vanishing ridge would let crafted tables overflow the re-fit


@dataclass(frozen=True)
class EvaluationPlan:
    """What the server fixes for one evaluation release; the device holds it to its own policy first."""

    server_round: int
    dp: bool
    noise_multiplier: float
    delta: float
    refit_l2: float
    # The unit the device reports and holds its budget at for this release: "user" in a user-level run (the
    # release is user-level too, see bounded_per_device), else "record". Its cost is the same either way.
    unit: str = "record"

    def __post_init__(self) -> None:
        if self.unit not in ("record", "user"):
            raise PlanError(f"evaluation plan: unit={self.unit!r} is not 'record' or 'user'")
        if (self.dp and not self.noise_multiplier > 0) or not 0 <= self.noise_multiplier <= MAX_NOISE_MULTIPLIER:
            raise PlanError(f"evaluation plan: noise_multiplier={self.noise_multiplier!r} out of range")
        if not 0 < self.delta < 1 or not REFIT_L2_RANGE[0] <= self.refit_l2 <= REFIT_L2_RANGE[1] or \
                self.server_round < 0:
            raise PlanError("evaluation plan: delta, refit-l2 or server-round out of range")

    # Its metrics lie in [0, 1] whatever the device's data, so its sensitivity (sqrt(3)) holds for the whole
    # device: a user-level release too (shared/privacy/releases.py).
    bounded_per_device = True

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
    # NaN (or inf) from crafted tables would pass a clamp and reveal the computation: it counts as 0 before the clamp
    raw = np.array([metrics[k] for k in RELEASED_METRICS], dtype=np.float64)
    values = np.clip(np.nan_to_num(raw, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    if plan.dp:
        values = values + rng.normal(0.0, plan.metric_std, size=values.shape)
    return {k: float(v) for k, v in zip(RELEASED_METRICS, values)}

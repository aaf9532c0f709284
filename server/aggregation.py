"""Server optimizers that apply the round's mean item delta: FedAvg, or FedAdam.

FedAdam follows Reddi et al. 2021 ("Adaptive Federated Optimization"), with the mean delta as
the pseudo-gradient step. The mean itself comes from shared/aggregation.py.
"""

from __future__ import annotations

import numpy as np

from fedrec.shared.aggregation import Delta
from fedrec.shared.model import ItemTables

class ServerOptimizer:
    """Applies the aggregated delta to the global item tables; its state is checkpointed."""

    def __init__(self, kind: str, *, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if kind not in ("fedavg", "fedadam"):
            raise ValueError(f"server optimizer '{kind}': expected fedavg or fedadam")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.moments: dict[str, np.ndarray] = {}

    def apply(self, tables: ItemTables, delta: Delta) -> ItemTables:
        if self.kind == "fedavg":
            return ItemTables(embedding=tables.embedding + self.lr * delta[0], bias=tables.bias + self.lr * delta[1])
        steps = [self._adam_step(name, d) for name, d in (("embedding", delta[0]), ("bias", delta[1]))]
        return ItemTables(embedding=(tables.embedding + steps[0]).astype(np.float32),
                          bias=(tables.bias + steps[1]).astype(np.float32))

    def _adam_step(self, name: str, delta: np.ndarray) -> np.ndarray:
        m = self.moments.get(f"{name}.m", np.zeros_like(delta))
        v = self.moments.get(f"{name}.v", np.full_like(delta, self.tau**2))
        m = self.beta1 * m + (1 - self.beta1) * delta
        v = self.beta2 * v + (1 - self.beta2) * delta**2
        self.moments[f"{name}.m"], self.moments[f"{name}.v"] = m, v
        return self.lr * m / (np.sqrt(v) + self.tau)

    def state_dict(self) -> dict[str, np.ndarray]:
        return dict(self.moments)

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.moments = {k: np.asarray(v) for k, v in state.items()}

"""One device's side of a round: budget check, DP training, state update, and on-device evaluation.

Train:
  1. load the device's state (user row, privacy history); a corrupt state stops here;
  2. compute the epsilon the round would bring it to; if above its budget, decline (nothing trained);
  3. train with Opacus against the received item tables, save the new state atomically;
  4. return only the item-table delta and the cumulative epsilon.
Evaluate: re-fit the user row to the received item model and rank unseen items.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from .data.interactions import DataError, DeviceEvents, DeviceSplit, split_device
from .evaluation import DEVICE_METRIC_KEYS, rank_scores
from .model import ItemTables, initial_user_row
from .privacy.accounting import epsilon, epsilon_after
from .ranking import refit_user_row
from .state import DeviceState
from .training import DeviceTrainingData, LocalTrainingPlan, train_cohort


class StateStore(Protocol):
    """Where a device keeps its state (a file in deployment and `fedrec simulate`; Flower's Context.state otherwise)."""

    def load(self) -> DeviceState | None: ...

    def save(self, state: DeviceState) -> None: ...


@dataclass(frozen=True)
class TrainOutcome:
    declined: bool
    epsilon: float  # cumulative over every round this device trained in
    embedding_delta: np.ndarray | None = None
    bias_delta: np.ndarray | None = None


@dataclass(frozen=True)
class DevicePolicy:
    """The device's own settings; the budget is enforced here, whatever the server asks for."""

    epsilon_budget: float
    embedding_dim: int
    init_scale: float
    seed: int


class Device:
    def __init__(self, device_id: str, device_key: int, events: DeviceEvents, store: StateStore,
                 policy: DevicePolicy) -> None:
        self.device_id = device_id
        self.device_key = device_key
        self.store = store
        self.policy = policy
        split = split_device(events)
        if split is None:
            raise DataError(f"device {device_id}: needs at least 3 distinct items to train and evaluate")
        self.split: DeviceSplit = split

    def load_state(self) -> DeviceState:
        state = self.store.load()
        if state is None:
            return DeviceState(device_id=self.device_id)
        if state.device_id != self.device_id:
            raise DataError(f"device state belongs to '{state.device_id}', not '{self.device_id}'")
        return state

    def epsilon(self, delta: float) -> float:
        return epsilon(self.load_state().history, delta=delta)

    def train(self, plan: LocalTrainingPlan, tables: ItemTables) -> TrainOutcome:
        state = self.load_state()
        if plan.dp:
            after = epsilon_after(state.history, noise_multiplier=plan.noise_multiplier,
                                  sample_rate=plan.sample_rate, steps=plan.steps, delta=plan.delta)
            if after > self.policy.epsilon_budget:
                self.store.save(replace(state, declined=(*state.declined, plan.server_round)))
                return TrainOutcome(declined=True, epsilon=epsilon(state.history, delta=plan.delta))
        user_row = state.user_row
        if user_row is None or user_row.shape != (tables.dim,):
            rng = np.random.default_rng([self.policy.seed, self.device_key, 0x05E5])
            user_row = initial_user_row(tables.dim, scale=self.policy.init_scale, rng=rng)
        data = DeviceTrainingData(items=self.split.train_items, weights=self.split.train_weights,
                                  seed=(self.policy.seed, self.device_key, plan.server_round))
        update = train_cohort(plan, tables, user_row[None], [data], [state.history],
                              noise_seed=_noise_seed(self.policy.seed, self.device_key, plan.server_round))
        history = tuple(update.histories[0]) if plan.dp else state.history
        self.store.save(replace(state, user_row=update.user_rows[0], history=history,
                                rounds=(*state.rounds, plan.server_round)))
        return TrainOutcome(declined=False, epsilon=epsilon(history, delta=plan.delta),
                            embedding_delta=update.embedding_delta[0], bias_delta=update.bias_delta[0])

    def evaluate(self, tables: ItemTables, *, target: str, l2: float, sampled_seed: int) -> dict[str, float]:
        row = refit_user_row(tables, self.split.train_items, self.split.train_weights, l2=l2)
        metrics = rank_scores(tables.scores(row[None]), [self.split], target=target, sampled_seed=sampled_seed)
        return {k: float(v[0]) for k, v in metrics.items() if k in DEVICE_METRIC_KEYS or k.startswith("sampled_")}


def _noise_seed(seed: int, device_key: int, server_round: int) -> int:
    return int(np.random.SeedSequence([seed, device_key, server_round, 0x7015E]).generate_state(1, np.uint64)[0] >> 1)

"""One device's side of a round: budget check, DP training, state update, and on-device evaluation.

Train:
  1. load the device's state (user row, privacy history); a corrupt state stops here;
  2. compute the epsilon the round would bring it to; if above its budget, decline (nothing trained);
  3. train with Opacus against the received item tables, save the new state atomically;
  4. return only the item-table delta and the cumulative epsilon.
Evaluate: re-fit the user row to the received item model and rank unseen items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from .aggregation import PartialSum
from .data.interactions import DataError, DeviceEvents, DeviceSplit, split_device
from .evaluation import DEVICE_METRIC_KEYS, rank_scores
from .model import ItemTables, initial_user_row
from .popularity import PopularityPlan, noisy_indicator
from .privacy.accounting import HistoryEntry, compact_history, epsilon, epsilon_after
from .ranking import refit_user_row
from .state import DeviceState
from .training import DeviceTrainingData, LocalTrainingPlan, train_cohort


COHORT_BYTES = 64 * 2**20  # stacked item tables per cohort pass


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
        return train_devices([self], plan, tables)[0]

    def over_budget(self, plan: LocalTrainingPlan | PopularityPlan, state: DeviceState) -> bool:
        """Would this round take the device past its budget? Decided before any data is touched."""
        if not plan.dp:
            return False
        after = epsilon_after(state.history, plan.privacy_steps(), delta=plan.delta)
        return after > self.policy.epsilon_budget

    def report_popularity(self, plan: PopularityPlan, num_items: int) -> tuple[TrainOutcome, np.ndarray | None]:
        """The noisy item indicator of this device (see shared/popularity.py), or a decline."""
        state = self.load_state()
        if self.over_budget(plan, state):
            return self.decline(plan, state), None
        report = noisy_indicator(self.split.train_items, self.split.train_weights, num_items, plan=plan,
                                 seed=_noise_seed(self.policy.seed, [self.device_key], plan.server_round))
        history = compact_history([*state.history, *plan.privacy_steps()])
        self.store.save(replace(state, history=tuple(history), rounds=(*state.rounds, plan.server_round)))
        return TrainOutcome(declined=False, epsilon=epsilon(history, delta=plan.delta)), report

    def decline(self, plan: LocalTrainingPlan | PopularityPlan, state: DeviceState) -> TrainOutcome:
        self.store.save(replace(state, declined=(*state.declined, plan.server_round)))
        return TrainOutcome(declined=True, epsilon=epsilon(state.history, delta=plan.delta))

    def user_row(self, state: DeviceState, dim: int) -> np.ndarray:
        if state.user_row is not None and state.user_row.shape == (dim,):
            return state.user_row
        rng = np.random.default_rng([self.policy.seed, self.device_key, 0x05E5])
        return initial_user_row(dim, scale=self.policy.init_scale, rng=rng)

    def training_data(self, plan: LocalTrainingPlan) -> DeviceTrainingData:
        return DeviceTrainingData(items=self.split.train_items, weights=self.split.train_weights,
                                  seed=(self.policy.seed, self.device_key, plan.server_round))

    def commit(self, plan: LocalTrainingPlan, state: DeviceState, user_row: np.ndarray,
               history: list[HistoryEntry]) -> float:
        """Store the new user row and privacy history atomically; returns the cumulative epsilon."""
        new_history = tuple(history) if plan.dp else state.history
        self.store.save(replace(state, user_row=user_row, history=new_history,
                                rounds=(*state.rounds, plan.server_round)))
        return epsilon(new_history, delta=plan.delta)

    def evaluate(self, tables: ItemTables, *, target: str, l2: float, sampled_seed: int) -> dict[str, float]:
        row = refit_user_row(tables, self.split.train_items, self.split.train_weights, l2=l2)
        metrics = rank_scores(tables.scores(row[None]), [self.split], target=target, sampled_seed=sampled_seed)
        return {k: float(v[0]) for k, v in metrics.items() if k in DEVICE_METRIC_KEYS or k.startswith("sampled_")}


def train_devices(devices: Sequence[Device], plan: LocalTrainingPlan, tables: ItemTables, *,
                  into: PartialSum | None = None, delta_clip: float = 0.0,
                  max_cohort_bytes: int = COHORT_BYTES) -> list[TrainOutcome]:
    """One round for several devices: budget checks, then Opacus passes over cohorts of those that train.

    Each device's clipping, noise and accounting are exactly those of training it alone
    (shared/training.py); a single device is the deployment path. Cohorts are cut so their
    stacked item tables stay under `max_cohort_bytes`. With `into`, each update is clipped
    to `delta_clip` and added there as soon as its cohort is done, and not kept in the
    outcome: a node's memory then stays at one cohort, however many devices it trains.
    """
    states = [d.load_state() for d in devices]
    outcomes: list[TrainOutcome | None] = [None] * len(devices)
    active = []
    for j, (device, state) in enumerate(zip(devices, states)):
        if device.over_budget(plan, state):
            outcomes[j] = device.decline(plan, state)
        else:
            active.append(j)
    per_device = 4 * tables.num_items * (tables.dim + 1)
    size = max(1, max_cohort_bytes // per_device)
    for start in range(0, len(active), size):
        cohort = active[start:start + size]
        keys = [devices[j].device_key for j in cohort]
        update = train_cohort(plan, tables, np.stack([devices[j].user_row(states[j], tables.dim) for j in cohort]),
                              [devices[j].training_data(plan) for j in cohort], [states[j].history for j in cohort],
                              noise_seed=_noise_seed(devices[cohort[0]].policy.seed, keys, plan.server_round))
        for row, j in enumerate(cohort):
            eps = devices[j].commit(plan, states[j], update.user_rows[row], update.histories[row])
            delta = (update.embedding_delta[row], update.bias_delta[row])
            if into is not None:
                into.add(delta, clip=delta_clip)
                outcomes[j] = TrainOutcome(declined=False, epsilon=eps)
            else:
                outcomes[j] = TrainOutcome(declined=False, epsilon=eps, embedding_delta=delta[0], bias_delta=delta[1])
    return [o for o in outcomes if o is not None]


def report_popularity_sum(devices: Sequence[Device], plan: PopularityPlan,
                          num_items: int) -> tuple[list[TrainOutcome], np.ndarray | None]:
    """A node's popularity report: each device's outcome, and the float64 sum of the reports made (None if none)."""
    outcomes, total = [], None
    for device in devices:
        outcome, counts = device.report_popularity(plan, num_items)
        outcomes.append(outcome)
        if counts is not None:
            total = counts.astype(np.float64) if total is None else total + counts
    return outcomes, total


def _noise_seed(seed: int, device_keys: Sequence[int], server_round: int) -> int:
    entropy = [seed, server_round, 0x7015E, *device_keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)

"""One device's side of a round: its own policy first, then the budget, DP training, state update, evaluation.

Train (and the popularity report, and an evaluation release):
  1. load the device's state (user row, privacy history); a corrupt state stops here;
  2. hold the plan to the device's own privacy policy; a plan outside it is refused, by rule name,
     before any of the device's data is read;
  3. compute the epsilon the round would bring it to; if above its budget, decline (nothing read);
  4. read its data, train with Opacus against the received item tables, save the new state atomically;
  5. return only the item-table delta and the cumulative epsilon.
Evaluate: re-fit the user row to the received item model, rank unseen items, and release the
metrics only with Gaussian noise, charged to the budget like any other release.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .aggregation import PartialSum
from .data.interactions import DataError, DeviceEvents, DeviceSplit, split_device
from .eval_release import RELEASED_METRICS, EvaluationPlan, noisy_metrics
from .evaluation import rank_scores
from .model import ItemTables, initial_user_row
from .plans import LocalTrainingPlan
from .policy import Plan, PrivacyPolicy
from .popularity import PopularityPlan, noisy_indicator
from .privacy.accounting import HistoryEntry, compact_history, epsilon, epsilon_after
from .ranking import refit_user_row
from .state import DeviceState

if TYPE_CHECKING:  # torch and Opacus: imported where a device trains (train_devices), not on every message
    from .training import DeviceTrainingData


COHORT_BYTES = 64 * 2**20  # stacked item tables per cohort pass
MIN_DISTINCT_ITEMS = 3  # one for training at least, one validation, one test
MAX_REFUSALS_KEPT = 100  # the state keeps the latest refusals only: a server cannot grow it without bound


class NonFiniteUpdate(RuntimeError):
    """Local training produced NaN/Inf; the device charges the steps and sends nothing."""


class StateStore(Protocol):
    """Where a device keeps its state (a file in deployment and `fedrec simulate`; Flower's Context.state otherwise)."""

    def load(self) -> DeviceState | None: ...

    def save(self, state: DeviceState) -> None: ...


@dataclass(frozen=True)
class TrainOutcome:
    declined: bool  # declined (budget) or refused (policy): nothing of its data was read or sent
    epsilon: float  # cumulative over every release; inf once it released something without DP
    embedding_delta: np.ndarray | None = None
    bias_delta: np.ndarray | None = None
    refused: str = ""  # the policy rule the plan broke ('' = none)


@dataclass(frozen=True)
class DeviceSettings:
    """How a device builds its model and seeds its randomness (its privacy limits are its PrivacyPolicy)."""

    embedding_dim: int
    init_scale: float
    seed: int  # simulation: the run's seed (reproducible); deployment: drawn from OS entropy


class Device:
    def __init__(self, device_id: str, device_key: int, events: Callable[[], DeviceEvents], store: StateStore,
                 settings: DeviceSettings, policy: PrivacyPolicy) -> None:
        self.device_id = device_id
        self.device_key = device_key
        self.store = store
        self.settings = settings
        self.policy = policy
        self._events = events  # read only once a plan has passed the policy and the budget

    @cached_property
    def split(self) -> DeviceSplit:
        split = split_device(self._events())
        if split is None:
            raise DataError(f"device {self.device_id}: needs at least {MIN_DISTINCT_ITEMS} distinct items to train "
                            "and evaluate")
        return split

    def load_state(self) -> DeviceState:
        state = self.store.load()
        if state is None:
            return DeviceState(device_id=self.device_id)
        if state.device_id != self.device_id:
            raise DataError(f"device state belongs to '{state.device_id}', not '{self.device_id}'")
        return state

    def epsilon(self, delta: float) -> float:
        return self.cumulative_epsilon(self.load_state(), delta)

    def cumulative_epsilon(self, state: DeviceState, delta: float,
                           history: Sequence[HistoryEntry] | None = None) -> float:
        if state.non_private:
            return math.inf
        return epsilon(state.history if history is None else history, delta=min(delta, self.policy.max_delta))

    def train(self, plan: LocalTrainingPlan, tables: ItemTables) -> TrainOutcome:
        return train_devices([self], plan, tables)[0]

    def admit(self, plan: Plan, state: DeviceState) -> TrainOutcome | None:
        """The refusal (policy) or decline (budget) for `plan`, or None if the device may go ahead.

        Decided from the plan and the stored history alone, before any of the device's data is read.
        """
        rule = self.policy.refusal(plan)
        if rule:
            refused = (*state.refused, (plan.server_round, rule))[-MAX_REFUSALS_KEPT:]
            self.store.save(replace(state, refused=refused))
            return TrainOutcome(declined=True, epsilon=self.cumulative_epsilon(state, self.policy.max_delta),
                                refused=rule)
        if plan.dp and epsilon_after(state.history, plan.privacy_steps(), delta=plan.delta) > \
                self.policy.epsilon_budget:
            self.store.save(replace(state, declined=(*state.declined, plan.server_round)))
            return TrainOutcome(declined=True, epsilon=self.cumulative_epsilon(state, plan.delta))
        return None

    def report_popularity(self, plan: PopularityPlan, num_items: int, *,
                          nonce: int = 0) -> tuple[TrainOutcome, np.ndarray | None]:
        """The noisy item indicator of this device (see shared/popularity.py), or a refusal/decline."""
        state = self.load_state()
        verdict = self.admit(plan, state)
        if verdict is not None:
            return verdict, None
        report = noisy_indicator(self.split.train_items, self.split.train_weights, num_items, plan=plan,
                                 seed=_noise_seed(self.settings.seed, [self.device_key], plan.server_round, nonce))
        return self.commit(plan, state, state.user_row), report

    def evaluate(self, plan: EvaluationPlan, tables: ItemTables, *,
                 nonce: int = 0) -> tuple[TrainOutcome, dict[str, float] | None]:
        """Metrics of the received model on this device's held-out item: noised and charged, or refused/declined."""
        state = self.load_state()
        verdict = self.admit(plan, state)
        if verdict is not None:
            return verdict, None
        row = refit_user_row(tables, self.split.train_items, self.split.train_weights, l2=plan.refit_l2)
        ranked = rank_scores(tables.scores(row[None]), [self.split], target="test")
        exact = {k: float(ranked[k][0]) for k in RELEASED_METRICS}
        rng = np.random.default_rng(_noise_seed(self.settings.seed, [self.device_key], plan.server_round, nonce,
                                                salt=EVAL_NOISE_SALT))
        return self.commit(plan, state, state.user_row), noisy_metrics(exact, plan, rng)

    def user_row(self, state: DeviceState, dim: int) -> np.ndarray:
        if state.user_row is not None and state.user_row.shape == (dim,):
            return state.user_row
        rng = np.random.default_rng([self.settings.seed, self.device_key, 0x05E5])
        return initial_user_row(dim, scale=self.settings.init_scale, rng=rng)

    def training_data(self, plan: LocalTrainingPlan, nonce: int = 0) -> DeviceTrainingData:
        from .training import DeviceTrainingData

        return DeviceTrainingData(items=self.split.train_items, weights=self.split.train_weights,
                                  seed=(self.settings.seed, self.device_key, plan.server_round, nonce))

    def commit(self, plan: Plan, state: DeviceState, user_row: np.ndarray | None,
               history: Sequence[HistoryEntry] | None = None) -> TrainOutcome:
        """Store the release atomically (new user row, history with the plan's steps); returns the outcome."""
        new_history = tuple(compact_history(history if history is not None else
                                            [*state.history, *plan.privacy_steps()]))
        new_state = replace(state, user_row=user_row, history=new_history, rounds=(*state.rounds, plan.server_round),
                            non_private=state.non_private or not plan.dp)
        self.store.save(new_state)
        return TrainOutcome(declined=False, epsilon=self.cumulative_epsilon(new_state, plan.delta))


def train_devices(devices: Sequence[Device], plan: LocalTrainingPlan, tables: ItemTables, *,
                  into: PartialSum | None = None, delta_clip: float = 0.0, nonce: int = 0,
                  max_cohort_bytes: int = COHORT_BYTES) -> list[TrainOutcome]:
    """One round for several devices: policy and budget checks, then Opacus passes over cohorts of those that train.

    Each device's clipping, noise and accounting are exactly those of training it alone
    (shared/training.py); a single device is the deployment path. Cohorts are cut so their
    stacked item tables stay under `max_cohort_bytes`. With `into`, each update is clipped
    to `delta_clip` and added there as soon as its cohort is done, and not kept in the
    outcome: a node's memory then stays at one cohort, however many devices it trains.
    `nonce` names the attempt of the round, so a round run again draws fresh noise.
    """
    from .training import train_cohort  # torch and Opacus: the one path that needs them

    states = [d.load_state() for d in devices]
    outcomes: list[TrainOutcome | None] = [device.admit(plan, state) for device, state in zip(devices, states)]
    active = [j for j, verdict in enumerate(outcomes) if verdict is None]
    per_device = 4 * tables.num_items * (tables.dim + 1)
    size = max(1, max_cohort_bytes // per_device)
    for start in range(0, len(active), size):
        cohort = active[start:start + size]
        keys = [devices[j].device_key for j in cohort]
        update = train_cohort(plan, tables, np.stack([devices[j].user_row(states[j], tables.dim) for j in cohort]),
                              [devices[j].training_data(plan, nonce) for j in cohort],
                              [states[j].history for j in cohort],
                              noise_seed=_noise_seed(devices[cohort[0]].settings.seed, keys, plan.server_round, nonce))
        if not all(np.isfinite(a).all() for a in (update.user_rows, update.embedding_delta, update.bias_delta)):
            # Defence in depth (inputs are bounded on arrival): the steps are spent, nothing non-finite is kept or
            # sent, since a NaN pattern would show which rows a device's data touched.
            for row, j in enumerate(cohort):
                devices[j].commit(plan, states[j], states[j].user_row, update.histories[row])
            raise NonFiniteUpdate(f"round {plan.server_round}: training produced non-finite values; nothing sent")
        for row, j in enumerate(cohort):
            outcome = devices[j].commit(plan, states[j], update.user_rows[row], update.histories[row])
            delta = (update.embedding_delta[row], update.bias_delta[row])
            if into is not None:
                into.add(delta, clip=delta_clip)
                outcomes[j] = outcome
            else:
                outcomes[j] = replace(outcome, embedding_delta=delta[0], bias_delta=delta[1])
    return [o for o in outcomes if o is not None]


def report_popularity_sum(devices: Sequence[Device], plan: PopularityPlan, num_items: int, *,
                          nonce: int = 0) -> tuple[list[TrainOutcome], np.ndarray | None]:
    """A node's popularity report: each device's outcome, and the float64 sum of the reports made (None if none)."""
    outcomes, total = [], None
    for device in devices:
        outcome, counts = device.report_popularity(plan, num_items, nonce=nonce)
        outcomes.append(outcome)
        if counts is not None:
            total = counts.astype(np.float64) if total is None else total + counts
    return outcomes, total


EVAL_NOISE_SALT = 0xE7A15


def _noise_seed(seed: int, device_keys: Sequence[int], server_round: int, nonce: int = 0, *,
                salt: int = 0x7015E) -> int:
    entropy = [seed, server_round, salt, nonce, *device_keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)

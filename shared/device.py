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
from .distributed_dp import GridSum
from .data.interactions import DataError, DeviceEvents, DeviceSplit, split_device
from .eval_release import RELEASED_METRICS, EvaluationPlan, noisy_metrics
from .evaluation import rank_scores
from .model import ItemTables, initial_user_row
from .plans import LocalTrainingPlan, PlanError
from .policy import Plan, PrivacyPolicy
from .popularity import PopularityPlan, indicator, noisy_indicator
from .secure_release import update_vector
from .privacy.accounting import HistoryEntry, compact_history, epsilon, epsilon_after
from .privacy.releases import release_cost
from .ranking import refit_user_row
from .state import DeviceState

if TYPE_CHECKING:  # torch and Opacus: imported where a device trains (train_devices), not on every message
    from .training import DeviceTrainingData


COHORT_BYTES = 64 * 2**20  # stacked item tables per cohort pass
MIN_DISTINCT_ITEMS = 3  # one for training at least, one validation, one test
MAX_REFUSALS_KEPT = 100  # the state keeps the latest refusals and declines only: a server cannot grow it at will


class NonFiniteUpdate(RuntimeError):
    """Local training produced NaN/Inf; the device charges the steps and sends nothing."""


class StateStore(Protocol):
    """Where a device keeps its state (a file in deployment and `fedrec simulate`; Flower's Context.state otherwise)."""

    def load(self) -> DeviceState | None: ...

    def save(self, state: DeviceState) -> None: ...


@dataclass(frozen=True)
class TrainOutcome:
    declined: bool  # declined (budget) or refused (policy): nothing of its data was read or sent
    epsilon: float  # cumulative over every release, at the plan's unit; inf once it released something without DP
    embedding_delta: np.ndarray | None = None
    bias_delta: np.ndarray | None = None
    refused: str = ""  # the policy rule the plan broke ('' = none)
    epsilon_subverted: float = math.nan  # the same against a server that subverts secure aggregation


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

    def figures(self, state: DeviceState, delta: float, *, user_level: bool) -> tuple[float, float]:
        """(honest-but-curious, subverted-aggregation) epsilon at the record or user level."""
        if state.non_private or (user_level and state.not_user_level):
            return math.inf, math.inf
        histories = (state.user_history, state.user_subverted_history) if user_level else \
            (state.history, state.subverted_history)
        delta = min(delta, self.policy.max_delta)
        return epsilon(histories[0], delta=delta), epsilon(histories[1], delta=delta)

    def _outcome(self, state: DeviceState, plan: Plan, *, declined: bool, refused: str = "") -> TrainOutcome:
        honest, subverted = self.figures(state, plan.delta, user_level=getattr(plan, "privacy", "") == "user")
        return TrainOutcome(declined=declined, epsilon=honest, epsilon_subverted=subverted, refused=refused)

    def train(self, plan: LocalTrainingPlan, tables: ItemTables) -> TrainOutcome:
        return train_devices([self], plan, tables)[0]

    def admit(self, plan: Plan, state: DeviceState, t_min: int = 0) -> TrainOutcome | None:
        """The refusal (policy) or decline (budget) for `plan`, or None if the device may go ahead.

        Decided from the plan, the secure sum's threshold `t_min` (secure modes) and the stored history
        alone, before any of the device's data is read.
        """
        rule = self.policy.refusal(plan, t_min)
        if rule:
            refused = (*state.refused, (plan.server_round, rule))[-MAX_REFUSALS_KEPT:]
            state = replace(state, refused=refused)
            self.store.save(state)
            return self._outcome(state, plan, declined=True, refused=rule)
        if plan.dp and self._past_budget(plan, state, t_min):
            state = replace(state, declined=(*state.declined, plan.server_round)[-MAX_REFUSALS_KEPT:])
            self.store.save(state)
            return self._outcome(state, plan, declined=True)
        return None

    def _past_budget(self, plan: Plan, state: DeviceState, t_min: int) -> bool:
        """Would the release take the device past its budget (or its cap against subverted aggregation)?"""
        cost = release_cost(plan, t_min)
        user_level = getattr(plan, "privacy", "") == "user"
        if user_level and state.not_user_level:
            return True  # a user-level figure it can no longer make finite: never spend towards it
        honest, subverted = ((state.user_history, cost.user), (state.user_subverted_history, cost.user_subverted)) \
            if user_level else ((state.history, cost.record), (state.subverted_history, cost.record_subverted))
        if epsilon_after(honest[0], honest[1] or [], delta=plan.delta) > self.policy.epsilon_budget:
            return True
        cap = self.policy.max_subverted_epsilon
        return cap > 0 and epsilon_after(subverted[0], subverted[1] or [], delta=plan.delta) > cap

    def report_popularity(self, plan: PopularityPlan, num_items: int, *,
                          nonce: int = 0) -> tuple[TrainOutcome, np.ndarray | None]:
        """The noisy item indicator of this device (see shared/popularity.py), or a refusal/decline."""
        state = self.load_state()
        verdict = self.admit(plan, state)
        if verdict is not None:
            return verdict, None
        outcome = self.commit(plan, state)  # charged before the data is read (see train_devices)
        report = noisy_indicator(self.split.train_items, self.split.train_weights, num_items, plan=plan,
                                 seed=_noise_seed(self.settings.seed, [self.device_key], plan.server_round, nonce))
        return outcome, report

    def evaluate(self, plan: EvaluationPlan, tables: ItemTables, *,
                 nonce: int = 0) -> tuple[TrainOutcome, dict[str, float] | None]:
        """Metrics of the received model on this device's held-out item: noised and charged, or refused/declined."""
        state = self.load_state()
        verdict = self.admit(plan, state)
        if verdict is not None:
            return verdict, None
        # Charged before the data is read: a failure while ranking (the server shapes the tables' size) is
        # never free to repeat.
        outcome = self.commit(plan, state)
        row = refit_user_row(tables, self.split.train_items, self.split.train_weights, l2=plan.refit_l2)
        ranked = rank_scores(tables.scores(row[None]), [self.split], target="test")
        exact = {k: float(ranked[k][0]) for k in RELEASED_METRICS}
        rng = np.random.default_rng(_noise_seed(self.settings.seed, [self.device_key], plan.server_round, nonce,
                                                salt=EVAL_NOISE_SALT))
        return outcome, noisy_metrics(exact, plan, rng)

    def user_row(self, state: DeviceState, dim: int, plan: LocalTrainingPlan | None = None) -> np.ndarray:
        """The row a round starts from: in 'user' mode the exactly fitted one (if any), otherwise only the row
        that accounted, noised steps produced (or the data-independent initial row)."""
        if plan is not None and plan.privacy == "user" and state.user_row_exact is not None \
                and state.user_row_exact.shape == (dim,):
            return state.user_row_exact
        if state.user_row is not None and state.user_row.shape == (dim,):
            return state.user_row
        rng = np.random.default_rng([self.settings.seed, self.device_key, 0x05E5])
        return initial_user_row(dim, scale=self.settings.init_scale, rng=rng)

    def training_data(self, plan: LocalTrainingPlan, nonce: int = 0) -> DeviceTrainingData:
        from .training import DeviceTrainingData

        return DeviceTrainingData(items=self.split.train_items, weights=self.split.train_weights,
                                  seed=(self.settings.seed, self.device_key, plan.server_round, nonce))

    def commit(self, plan: Plan, state: DeviceState, user_row: np.ndarray | None = None,
               history: Sequence[HistoryEntry] | None = None, t_min: int = 0) -> TrainOutcome:
        """Store the release (`charge`) and return its outcome, with the epsilons the device reports."""
        return self._outcome(self.charge(plan, state, user_row, history, t_min), plan, declined=False)

    def charge(self, plan: Plan, state: DeviceState, user_row: np.ndarray | None = None,
               history: Sequence[HistoryEntry] | None = None, t_min: int = 0) -> DeviceState:
        """Store the release atomically (new user row, the four histories with its cost); returns the new state.

        `user_row`: the row the release trained (None: unchanged); a 'user' plan's goes to `user_row_exact`.
        `history`: the record-level history Opacus's accountant composed in local mode (the same steps).
        """
        cost = release_cost(plan, t_min)
        record = history if history is not None and getattr(plan, "privacy", "local") == "local" else \
            [*state.history, *cost.record]
        rows = {} if user_row is None else \
            {"user_row_exact" if getattr(plan, "privacy", "") == "user" else "user_row": user_row}
        new_state = replace(
            state, **rows, history=tuple(compact_history(record)),
            subverted_history=tuple(compact_history([*state.subverted_history, *cost.record_subverted])),
            user_history=tuple(compact_history([*state.user_history, *(cost.user or [])])),
            user_subverted_history=tuple(compact_history([*state.user_subverted_history,
                                                          *(cost.user_subverted or [])])),
            not_user_level=state.not_user_level or cost.user is None,
            rounds=(*state.rounds, plan.server_round), non_private=state.non_private or not cost.private)
        self.store.save(new_state)
        return new_state


def train_devices(devices: Sequence[Device], plan: LocalTrainingPlan, tables: ItemTables, *,
                  into: PartialSum | None = None, delta_clip: float = 0.0, nonce: int = 0,
                  max_cohort_bytes: int = COHORT_BYTES, secure: GridSum | None = None,
                  t_min: int = 0) -> list[TrainOutcome]:
    """One round for several devices: policy and budget checks, then Opacus passes over cohorts of those that train.

    Each device's clipping, noise and accounting are exactly those of training it alone
    (shared/training.py); a single device is the deployment path. Cohorts are cut so their
    stacked item tables stay under `max_cohort_bytes`. With `into`, each update is clipped
    to `delta_clip` and added there as soon as its cohort is done, and not kept in the
    outcome: a node's memory then stays at one cohort, however many devices it trains.
    `nonce` names the attempt of the round, so a round run again draws fresh noise.
    `secure` (distributed and user modes): each update is put on the grid and added there instead (the
    caller adds the devices' noise shares and masks the sum); `t_min` is the secure sum's threshold.
    """
    from .training import train_cohort  # torch and Opacus: the one path that needs them

    _secure_plan_only(plan, secure)
    if any(d.policy.exact_clipping for d in devices):  # how the device clips is its own choice, not the plan's
        plan = replace(plan, grad_sample_mode="hooks")

    states = [d.load_state() for d in devices]
    outcomes: list[TrainOutcome | None] = [device.admit(plan, state, t_min) for device, state in zip(devices, states)]
    active = [j for j, verdict in enumerate(outcomes) if verdict is None]
    per_device = 4 * tables.num_items * (tables.dim + 1)
    size = max(1, max_cohort_bytes // per_device)
    for start in range(0, len(active), size):
        cohort = active[start:start + size]
        keys = [devices[j].device_key for j in cohort]
        for j in cohort:
            # Write-ahead: the round is charged before any data is read, so a failure while training (an error, or
            # the process killed for memory, which a server can steer through the plan's shape) is never free to
            # repeat. The commit after training starts from the same state: the same charge, plus the new row.
            devices[j].charge(plan, states[j], None, t_min=t_min)  # its outcome is the commit's, below
        update = train_cohort(plan, tables, np.stack([devices[j].user_row(states[j], tables.dim, plan)
                                                      for j in cohort]),
                              [devices[j].training_data(plan, nonce) for j in cohort],
                              [states[j].history for j in cohort],
                              noise_seed=_noise_seed(devices[cohort[0]].settings.seed, keys, plan.server_round, nonce))
        if not all(np.isfinite(a).all() for a in (update.user_rows, update.embedding_delta, update.bias_delta)):
            # Defence in depth (inputs are bounded on arrival): the steps are spent, nothing non-finite is kept or
            # sent, since a NaN pattern would show which rows a device's data touched.
            for row, j in enumerate(cohort):
                devices[j].charge(plan, states[j], None, update.histories[row], t_min=t_min)
            raise NonFiniteUpdate(f"round {plan.server_round}: training produced non-finite values; nothing sent")
        for row, j in enumerate(cohort):
            outcome = devices[j].commit(plan, states[j], update.user_rows[row], update.histories[row], t_min=t_min)
            delta = (update.embedding_delta[row], update.bias_delta[row])
            if secure is not None:
                secure.add(update_vector(plan, *delta))
                outcomes[j] = outcome
            elif into is not None:
                into.add(delta, clip=delta_clip)
                outcomes[j] = outcome
            else:
                outcomes[j] = replace(outcome, embedding_delta=delta[0], bias_delta=delta[1])
    return [o for o in outcomes if o is not None]


def report_popularity_sum(devices: Sequence[Device], plan: PopularityPlan, num_items: int, *,
                          nonce: int = 0, secure: GridSum | None = None,
                          t_min: int = 0) -> tuple[list[TrainOutcome], np.ndarray | None]:
    """A node's popularity report: each device's outcome, and the float64 sum of the reports made (None if none).

    `secure` (distributed and user modes): each indicator goes onto the grid there instead (un-noised: the
    caller adds the shares' noise to the sum), and the second value is None.
    """
    outcomes, total = [], None
    _secure_plan_only(plan, secure)
    if secure is not None:
        for device in devices:
            state = device.load_state()
            verdict = device.admit(plan, state, t_min)
            if verdict is not None:
                outcomes.append(verdict)
                continue
            outcomes.append(device.commit(plan, state, t_min=t_min))  # charged before the data is read
            secure.add(indicator(device.split.train_items, device.split.train_weights, num_items,
                                 unit_norm=plan.privacy == "user"))
        return outcomes, None
    for device in devices:
        outcome, counts = device.report_popularity(plan, num_items, nonce=nonce)
        outcomes.append(outcome)
        if counts is not None:
            total = counts.astype(np.float64) if total is None else total + counts
    return outcomes, total


def _secure_plan_only(plan: LocalTrainingPlan | PopularityPlan, secure: GridSum | None) -> None:
    """A secure sum takes only the plans whose noise is shared out in it, and those plans only go into one."""
    if (secure is not None) != (plan.dp and plan.privacy in ("distributed", "user")):
        raise PlanError(f"a {plan.privacy!r} plan (dp={plan.dp}) "
                        f"{'cannot go into' if secure is not None else 'must go into'} a secure sum")


EVAL_NOISE_SALT = 0xE7A15


def _noise_seed(seed: int, device_keys: Sequence[int], server_round: int, nonce: int = 0, *,
                salt: int = 0x7015E) -> int:
    entropy = [seed, server_round, salt, nonce, *device_keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


SHARE_SALT = 0x5EC5


def share_seed(devices: Sequence[Device], server_round: int, nonce: int) -> int:
    """The seed of the devices' noise shares in a secure sum (their settings' seed: OS entropy in deployment)."""
    return _noise_seed(devices[0].settings.seed, [d.device_key for d in devices], server_round, nonce,
                       salt=SHARE_SALT)

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

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .aggregation import PartialSum
from .distributed_dp import GridSum
from .data.interactions import DataError, DeviceEvents, DeviceSplit, split_device
from .head import local_index
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

log = logging.getLogger("fedrec.device")

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

    def locked(self) -> AbstractContextManager[object]: ...


@dataclass(frozen=True)
class TrainOutcome:
    declined: bool  # declined (budget) or refused (policy): nothing of its data was read or sent
    epsilon: float  # cumulative over every release, at the plan's unit; inf once it released something without DP
    embedding_delta: np.ndarray | None = None
    bias_delta: np.ndarray | None = None
    refused: str = ""  # the policy rule the plan broke ('' = none)
    epsilon_subverted: float = math.nan  # own share: against a server that also controls enrolment
    epsilon_honest: float = math.nan  # against a server that follows the protocol
    secure_sum: tuple[int, int] | None = None  # (t, c) the device accounted this release with (secure modes)


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
        return epsilon(state.history if history is None else history, delta=min(delta, self.policy.max_delta),
                       exact_gaussian=state.gaussian_record)

    def figures(self, state: DeviceState, delta: float, *, user_level: bool) -> tuple[float, float, float]:
        """(malicious with c colluders: the headline, honest-but-curious, own share) epsilon at the record or user
        level (shared/privacy/releases.py)."""
        if state.non_private or (user_level and state.not_user_level):
            return math.inf, math.inf, math.inf
        histories = (state.user_history, state.user_honest_history, state.user_subverted_history) if user_level \
            else (state.history, state.honest_history, state.subverted_history)
        delta = min(delta, self.policy.max_delta)
        exact = state.gaussian_record and not user_level
        return tuple(epsilon(h, delta=delta, exact_gaussian=exact) for h in histories)  # type: ignore[return-value]

    def _outcome(self, state: DeviceState, plan: Plan, *, declined: bool, refused: str = "",
                 secure_sum: tuple[int, int] | None = None) -> TrainOutcome:
        headline, honest, own = self.figures(state, plan.delta, user_level=user_level(plan))
        return TrainOutcome(declined=declined, epsilon=headline, epsilon_subverted=own, epsilon_honest=honest,
                            refused=refused, secure_sum=secure_sum)

    def train(self, plan: LocalTrainingPlan, tables: ItemTables) -> TrainOutcome:
        return train_devices([self], plan, tables)[0]

    def admit(self, plan: Plan, state: DeviceState, t_min: int = 0, colluders: int = 0, *,
              shape: tuple[int, int] = (0, 0)) -> TrainOutcome | None:
        """The refusal (policy) or decline (budget) for `plan`, or None if the device may go ahead.

        Decided from the plan, the secure sum's threshold `t_min` and assumed colluders (secure modes) and the
        stored history alone, before any of the device's data is read.
        """
        rule = self.policy.refusal(plan, t_min, colluders, num_items=shape[0], dim=shape[1])
        if rule:
            return self.refuse(plan, state, rule)
        if plan.dp and self._past_budget(plan, state, t_min, colluders):
            state = replace(state, declined=(*state.declined, plan.server_round)[-MAX_REFUSALS_KEPT:])
            self.store.save(state)
            return self._outcome(state, plan, declined=True)
        return None

    def refuse(self, plan: Plan, state: DeviceState, rule: str) -> TrainOutcome:
        """Record that `plan` broke `rule` (kept in the state for the device's owner) and return the refusal."""
        state = replace(state, refused=(*state.refused, (plan.server_round, rule))[-MAX_REFUSALS_KEPT:])
        self.store.save(state)
        return self._outcome(state, plan, declined=True, refused=rule)

    def _past_budget(self, plan: Plan, state: DeviceState, t_min: int, colluders: int = 0) -> bool:
        """Would the release take the device past its budget (on the headline figure: a malicious server with c
        colluders) or its cap on the own-share figure?"""
        cost = release_cost(plan, t_min, colluders)
        at_user_level = user_level(plan)
        if at_user_level and state.not_user_level:
            return True  # a user-level figure it can no longer make finite: never spend towards it
        headline, subverted = ((state.user_history, cost.user), (state.user_subverted_history, cost.user_subverted)) \
            if at_user_level else ((state.history, cost.record), (state.subverted_history, cost.record_subverted))
        exact = not at_user_level and state.gaussian_record and gaussian_release(plan, t_min)
        if epsilon_after(headline[0], headline[1] or [], delta=plan.delta, exact_gaussian=exact) > \
                self.policy.epsilon_budget:
            return True
        cap = self.policy.max_subverted_epsilon
        return cap > 0 and epsilon_after(subverted[0], subverted[1] or [], delta=plan.delta, exact_gaussian=exact) > cap

    def report_popularity(self, plan: PopularityPlan, num_items: int, *,
                          nonce: int = 0) -> tuple[TrainOutcome, np.ndarray | None]:
        """The noisy item indicator of this device (see shared/popularity.py), or a refusal/decline."""
        verdict, _ = self.reserve(plan)  # charged before the data is read (see train_devices)
        if verdict is not None:
            return verdict, None
        outcome = self.outcome(plan)
        report = noisy_indicator(self.split.train_items, self.split.train_weights, num_items, plan=plan,
                                 seed=_noise_seed(self.settings.seed, [self.device_key], plan.server_round, nonce))
        return outcome, report

    def evaluate(self, plan: EvaluationPlan, tables: ItemTables, *,
                 nonce: int = 0) -> tuple[TrainOutcome, dict[str, float] | None]:
        """Metrics of the received model on this device's held-out item: noised and charged, or refused/declined."""
        # Charged before the data is read: a failure while ranking (the server shapes the tables' size) is
        # never free to repeat.
        verdict, _ = self.reserve(plan)
        if verdict is not None:
            return verdict, None
        outcome = self.outcome(plan)
        try:
            row = refit_user_row(tables, self.split.train_items, self.split.train_weights, l2=plan.refit_l2)
            ranked = rank_scores(tables.scores(row[None]), [self.split], target="test")
            exact = {k: float(ranked[k][0]) for k in RELEASED_METRICS}
        except (MemoryError, RuntimeError) as err:
            # Whether ranking fails can depend on the data (the re-fit's memory grows with the log, and the server
            # shapes the tables): answered as a release of zero metrics with the same noise, never as an error,
            # so the failure shows nothing outside the accounted release.
            log.warning("round %d: evaluation failed after it was charged (%s); releasing noised zeros",
                        plan.server_round, type(err).__name__)
            exact = {k: 0.0 for k in RELEASED_METRICS}
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

    def training_data(self, plan: LocalTrainingPlan, nonce: int = 0,
                      index: np.ndarray | None = None) -> DeviceTrainingData:
        """This round's training interactions; `index` (catalogue id -> head position, -1 outside): only the items
        of the round's trained head, renumbered to its rows (the rest of the catalogue does not train)."""
        from .training import DeviceTrainingData

        items, weights = self.split.train_items, self.split.train_weights
        if index is not None:
            local = index[items]
            keep = local >= 0
            items, weights = local[keep], weights[keep]
        return DeviceTrainingData(items=items, weights=weights,
                                  seed=(self.settings.seed, self.device_key, plan.server_round, nonce))

    def screen(self, plan: Plan, t_min: int = 0, colluders: int = 0, rule: str = "", *,
               shape: tuple[int, int] = (0, 0)) -> TrainOutcome | None:
        """Under the state's lock, on the state as stored now: the refusal (`rule`, or the policy's) or decline for
        `plan`, recorded, or None if it may go ahead (nothing is charged: see reserve)."""
        with self.store.locked():
            state = self.load_state()
            return self.refuse(plan, state, rule) if rule else self.admit(plan, state, t_min, colluders, shape=shape)

    def reserve(self, plan: Plan, t_min: int = 0, colluders: int = 0, *,
                shape: tuple[int, int] = (0, 0)) -> tuple[TrainOutcome | None, DeviceState]:
        """Admit and charge `plan` in one step under the state's lock: (the refusal or decline, or None once
        charged; the state as it was before the charge). Write-ahead: the release is stored before any data is
        read, so a failure afterwards (an error, the process killed) is never free to repeat, and no other
        message on the same state can interleave between the budget check and the charge."""
        with self.store.locked():
            state = self.load_state()
            verdict = self.admit(plan, state, t_min, colluders, shape=shape)
            if verdict is None:
                self.charge(plan, state, t_min=t_min, colluders=colluders)
            return verdict, state

    def store_row(self, plan: Plan, user_row: np.ndarray) -> None:
        """After training: keep the new user row, on the state as it is now (re-read under the lock, so a charge
        stored since the round started is never overwritten). A 'user' plan's row goes to `user_row_exact`."""
        with self.store.locked():
            field_name = "user_row_exact" if getattr(plan, "privacy", "") == "user" else "user_row"
            self.store.save(replace(self.load_state(), **{field_name: user_row}))

    def outcome(self, plan: Plan, secure_sum: tuple[int, int] | None = None) -> TrainOutcome:
        """The outcome of a committed release, with the figures of the state as stored now."""
        return self._outcome(self.load_state(), plan, declined=False, secure_sum=secure_sum)

    def charge(self, plan: Plan, state: DeviceState, t_min: int = 0, colluders: int = 0) -> DeviceState:
        """Store `state` with the release's cost added to its six histories (atomically); returns the new state.
        Callers hold the store's lock and pass the state they loaded under it (see reserve)."""
        cost = release_cost(plan, t_min, colluders)
        new_state = replace(
            state, history=tuple(compact_history([*state.history, *cost.record])),
            subverted_history=tuple(compact_history([*state.subverted_history, *cost.record_subverted])),
            honest_history=tuple(compact_history([*state.honest_history, *cost.record_honest])),
            user_honest_history=tuple(compact_history([*state.user_honest_history, *(cost.user_honest or [])])),
            secure_sums=(*state.secure_sums, (plan.server_round, t_min, colluders))[-MAX_REFUSALS_KEPT:]
            if t_min else state.secure_sums,
            user_history=tuple(compact_history([*state.user_history, *(cost.user or [])])),
            user_subverted_history=tuple(compact_history([*state.user_subverted_history,
                                                          *(cost.user_subverted or [])])),
            not_user_level=state.not_user_level or cost.user is None,
            gaussian_record=state.gaussian_record and gaussian_release(plan, t_min),
            rounds=(*state.rounds, plan.server_round), non_private=state.non_private or not cost.private)
        self.store.save(new_state)
        return new_state


def gaussian_release(plan: Plan, t_min: int = 0) -> bool:
    """Whether the release is a plain Gaussian mechanism at the multiplier it lists (no secure sum)."""
    return not t_min and getattr(plan, "privacy", "local") not in ("distributed", "user")


def user_level(plan: Plan) -> bool:
    """Whether a release is reported and budgeted at the user level: a 'user' plan, or an evaluation release in a
    user-level run (its metrics are bounded per device, so it is a user-level release too)."""
    return getattr(plan, "privacy", "") == "user" or getattr(plan, "unit", "") == "user"


def train_devices(devices: Sequence[Device], plan: LocalTrainingPlan, tables: ItemTables, *,
                  into: PartialSum | None = None, delta_clip: float = 0.0, nonce: int = 0,
                  max_cohort_bytes: int = COHORT_BYTES, secure: GridSum | None = None,
                  t_min: int = 0, colluders: int = 0, head: np.ndarray | None = None) -> list[TrainOutcome]:
    """One round for several devices: policy and budget checks, then Opacus passes over cohorts of those that train.

    Each device's clipping, noise and accounting are exactly those of training it alone
    (shared/training.py); a single device is the deployment path. Cohorts are cut so their
    stacked item tables stay under `max_cohort_bytes`. With `into`, each update is clipped
    to `delta_clip` and added there as soon as its cohort is done, and not kept in the
    outcome: a node's memory then stays at one cohort, however many devices it trains.
    `nonce` names the attempt of the round, so a round run again draws fresh noise.
    `secure` (distributed and user modes): each update is put on the grid and added there instead (the
    caller adds the devices' noise shares and masks the sum); `t_min` is the secure sum's threshold and
    `colluders` the devices assumed to collude with the server in it. `head`: the item ids the plan trains (checked
    by the caller against the plan, shared/protocol.py head_from_arrays); only those rows train and are sent.
    """
    from .training import train_cohort  # torch and Opacus: the one path that needs them

    _secure_plan_only(plan, secure)
    if (0 if head is None else len(head)) != plan.head_size:
        raise ValueError(f"round {plan.server_round}: the plan trains {plan.head_size} head items, "
                         f"{0 if head is None else len(head)} given")
    index = local_index(head, tables.num_items) if head is not None else None
    tables = tables.take(head)
    if any(d.policy.exact_clipping for d in devices):  # how the device clips is its own choice, not the plan's
        plan = replace(plan, grad_sample_mode="hooks")

    outcomes: list[TrainOutcome | None] = []
    states: list[DeviceState] = []
    for device in devices:
        # Write-ahead under the lock: every device that trains is charged before any data is read.
        verdict, state = device.reserve(plan, t_min, colluders, shape=(tables.num_items, tables.dim))
        outcomes.append(verdict)
        states.append(state)
    active = [j for j, verdict in enumerate(outcomes) if verdict is None]
    per_device = 4 * tables.num_items * (tables.dim + 1)
    size = max(1, max_cohort_bytes // per_device)
    secure_sum = (t_min, colluders) if t_min else None
    for start in range(0, len(active), size):
        cohort = active[start:start + size]
        keys = [devices[j].device_key for j in cohort]
        update = train_cohort(plan, tables, np.stack([devices[j].user_row(states[j], tables.dim, plan)
                                                      for j in cohort]),
                              [devices[j].training_data(plan, nonce, index) for j in cohort],
                              [states[j].history for j in cohort],
                              noise_seed=_noise_seed(devices[cohort[0]].settings.seed, keys, plan.server_round, nonce))
        if not all(np.isfinite(a).all() for a in (update.user_rows, update.embedding_delta, update.bias_delta)):
            # Defence in depth (inputs are bounded on arrival): the steps are spent (charged ahead), nothing
            # non-finite is kept or sent, since a NaN pattern would show which rows a device's data touched.
            raise NonFiniteUpdate(f"round {plan.server_round}: training produced non-finite values; nothing sent")
        for row, j in enumerate(cohort):
            devices[j].store_row(plan, update.user_rows[row])
            outcome = devices[j].outcome(plan, secure_sum)
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
                          t_min: int = 0, colluders: int = 0) -> tuple[list[TrainOutcome], np.ndarray | None]:
    """A node's popularity report: each device's outcome, and the float64 sum of the reports made (None if none).

    `secure` (distributed and user modes): each indicator goes onto the grid there instead (un-noised: the
    caller adds the shares' noise to the sum), and the second value is None.
    """
    outcomes, total = [], None
    _secure_plan_only(plan, secure)
    if secure is not None:
        for device in devices:
            verdict, _ = device.reserve(plan, t_min, colluders)  # charged before the data is read
            if verdict is not None:
                outcomes.append(verdict)
                continue
            outcomes.append(device.outcome(plan, (t_min, colluders)))
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

"""What one release costs a device, in six figures: record or user level, by the threat each holds against.

A device keeps six privacy histories (shared/state.py), three per unit:
- record (the headline): record-level RDP against a malicious server that deviates from the protocol and
  colludes with at most the c devices the plan and the device's policy assume, but cannot enrol identities;
  every release the device ever made is composed here, so it is the device's lifetime guarantee, and its
  budget is enforced on it;
- record_honest: the same against a server that follows the protocol (honest but curious);
- record_subverted: against a server that also controls enrolment (Sybils): only the device's own noise
  share protects it ("own share"). All three are equal in local mode;
- user, user_honest, user_subverted: user-level (the whole device is the unit); finite only while every
  release the device made was user-level (a record-level release gives no user-level guarantee).
The budget is enforced on the unit of the run's mode (user level in 'user', record level otherwise); a
user-level release also counts at record level, with twice the sensitivity (a record changed inside a
device moves its clipped update by up to 2S).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..distributed_dp import distributed_entries
from .accounting import HistoryEntry


@dataclass(frozen=True)
class ReleaseCost:
    record: list[HistoryEntry]
    record_honest: list[HistoryEntry]
    record_subverted: list[HistoryEntry]
    user: list[HistoryEntry] | None  # None: this release has no user-level guarantee
    user_honest: list[HistoryEntry] | None
    user_subverted: list[HistoryEntry] | None
    private: bool = True  # False: released without DP (epsilon inf from then on)


def release_cost(plan: object, t_min: int = 0, colluders: int = 0) -> ReleaseCost:
    """The history entries of one release of `plan` into a sum of at least `t_min` shares (0: no sum), `colluders`
    of which may belong to devices colluding with the server."""
    if not getattr(plan, "dp", False):
        return ReleaseCost([], [], [], None, None, None, private=False)
    mode = getattr(plan, "privacy", "local")
    steps = list(plan.privacy_steps())  # type: ignore[attr-defined]
    if mode == "local":
        # A release whose value is bounded whatever the device's data (an evaluation release: metrics in [0, 1])
        # has the same sensitivity for the whole device: it is a user-level release too.
        user = steps if getattr(plan, "bounded_per_device", False) else None
        return ReleaseCost(steps, steps, steps, user, user, user)
    if t_min < 1:
        raise ValueError(f"a {mode} plan releases into a secure sum: t_min must be >= 1, got {t_min}")
    sigma = float(plan.noise_multiplier)  # type: ignore[attr-defined]
    if mode == "distributed":
        honest, malicious, own = distributed_entries(sigma, t_min, colluders)
        local = steps[1:]  # the user-row steps (training plans): local noise, never sent
        return ReleaseCost([malicious, *local], [honest, *local], [own, *local], None, None, None)
    user_honest, user_malicious, user_own = distributed_entries(sigma, t_min, colluders)
    rec_honest, rec_malicious, rec_own = distributed_entries(sigma, t_min, colluders, sensitivity_factor=2.0)
    return ReleaseCost([rec_malicious], [rec_honest], [rec_own], [user_malicious], [user_honest], [user_own])

"""Empirical privacy checks in the secure modes, from what the attacker there sees: the decrypted sums, or (aggregation
subverted) one device's vector with only its own noise share.

A round of the attack federation runs the real pieces: the server's plan and cohort (server/core.py), the devices'
training and secure-sum vectors (shared/device.py, shared/secure_release.py), the grid and Skellam shares
(shared/distributed_dp.py), the server's update from the decoded sum. What the attacker keeps:
  1. distributed (record level): device k may hold one extra interaction with its own canary item (probability
     1/2, attacks.CanaryPopulation); the score of canary k is the squared movement of its item's row, summed over
     the rounds device k was asked, in the decrypted sums (honest aggregation) and in device k's own vector plus its
     own share (subverted aggregation);
  2. user (user level): canary devices, each with a fixed random direction of norm S (the user-level clip), sampled
     into rounds at the devices' rate; a present canary sends its direction, an absent one its noise share on zero
     (what a device that commits and then declines sends). The score is the cosine of the sum of the decrypted sums
     of the rounds it joined with its direction (Andrew et al. 2024), and the same from its own vector plus share.
The popularity round is not attacked (its noise is the same mechanism; its one release adds little to a score).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedrec.server.core import (
    TRAIN_SALT,
    ItemModelServer,
    ServerRandomness,
    initial_tables,
    noise_multiplier_for,
    round_plan,
    sample_devices,
    secure_threshold,
)
from fedrec.shared.config import SECURE_MODES, RunConfig
from fedrec.shared.data.population import Population
from fedrec.shared.device import train_devices
from fedrec.shared.distributed_dp import GridSum, SumMechanism
from fedrec.shared.secure_release import split_update, training_mechanism

from .plain import build_devices

log = logging.getLogger("fedrec.simulation")
SHARE_SALT = 0xA77AC  # the attack federation's own noise shares (a simulation: seeded)


@dataclass
class RecordingGridSum(GridSum):
    """A secure sum that also keeps each device's quantised vector: what a server that strips the aggregation reads
    (before the device's own noise share is added)."""

    vectors: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def zeros(cls, mechanism: SumMechanism) -> RecordingGridSum:
        return cls(mechanism, np.zeros(mechanism.dimension, dtype=np.int64))

    def add(self, vector: np.ndarray | None) -> None:
        super().add(vector)
        self.vectors.append(np.zeros(self.mechanism.dimension, dtype=np.int64) if vector is None
                            else self.mechanism.quantise(vector)[0])


@dataclass
class SecureView:
    """Per canary, the attacker's evidence from the decrypted sums and from its device's own share."""

    present: np.ndarray  # bool [m]: the truth the attacker guesses
    sum_score: np.ndarray  # [m] float
    own_score: np.ndarray  # [m] float
    seen: np.ndarray  # bool [m]: the canary's device joined at least one decrypted round
    own_seen: np.ndarray  # bool [m]: the canary's device sent its own vector at least once
    cosines: np.ndarray  # user mode: [m] cosine of the joined rounds' summed sums with the canary's direction
    dimension: int
    epsilon: dict[str, float]  # the accountant's largest figure per threat over the devices that trained
    rounds_decrypted: int = 0


def _row_norms(vector: np.ndarray, items: np.ndarray, num_items: int, dim: int, biases: bool) -> np.ndarray:
    """Squared movement of the rows `items` in a flattened update (embedding rows, plus bias entries)."""
    emb = vector[: num_items * dim].reshape(num_items, dim)[items]
    out = np.sum(emb.astype(np.float64) ** 2, axis=1)
    if biases:
        out += vector[num_items * dim + items].astype(np.float64) ** 2
    return out


def observe_record_canaries(population: Any, config: RunConfig) -> SecureView:
    """Distributed mode: one record canary per device (attacks.CanaryPopulation); see the module docstring."""
    n, dim, m = population.num_items, config.embedding_dim, population.num_devices
    view = _empty_view(population.present, n * dim + (n if config.train_biases else 0))
    canary_items = np.array([population.canary_item(k) for k in range(m)])

    def per_round(chosen: list[int], mechanism: SumMechanism, grid: RecordingGridSum, decoded: np.ndarray | None,
                  rng: np.random.Generator) -> None:
        for k, vector in zip(chosen, grid.vectors):
            own = mechanism.decode(vector + mechanism.noise(rng))
            view.own_score[k] += _row_norms(own, canary_items[[k]], n, dim, config.train_biases)[0]
            view.own_seen[k] = True
        if decoded is not None:
            idx = np.array(chosen, dtype=np.int64)
            view.sum_score[idx] += _row_norms(decoded, canary_items[idx], n, dim, config.train_biases)
            view.seen[idx] = True

    _run(population, config, view, per_round, extra=None)
    return view


def observe_device_canaries(population: Population, config: RunConfig, *, canaries: int) -> SecureView:
    """User mode: `canaries` canary devices with random directions; see the module docstring."""
    n, dim = population.num_items, config.embedding_dim
    d = n * dim + (n if config.train_biases else 0)
    rng = np.random.default_rng([config.seed, 0xCA4D])
    present = rng.random(canaries) < 0.5
    directions = rng.standard_normal((canaries, d)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    view = _empty_view(present, d)
    dots = np.zeros(canaries)  # <sum of the joined rounds' decrypted sums, direction>
    joined_rounds: list[np.ndarray] = []  # per decrypted round: the canaries in it
    sums: list[np.ndarray] = []
    rate = min(1.0, config.devices_per_round / population.num_devices)

    def extra(server_round: int, grid: RecordingGridSum, clip: float) -> np.ndarray:
        """The canaries sampled into this round's sum (at the devices' rate), their vectors added to it."""
        picked = np.flatnonzero(np.random.default_rng([config.seed, server_round, 0xCA4E]).random(canaries) < rate)
        for c in picked:
            grid.add(clip * directions[c].astype(np.float64) if present[c] else None)
        return picked

    def per_round(picked: np.ndarray, mechanism: SumMechanism, grid: RecordingGridSum, decoded: np.ndarray | None,
                  share_rng: np.random.Generator) -> None:
        first = len(grid.vectors) - len(picked)  # the canaries were added after the real devices
        for j, c in enumerate(picked):
            own = mechanism.decode(grid.vectors[first + j] + mechanism.noise(share_rng))
            view.own_score[c] += float(own @ directions[c])
            view.own_seen[c] = True
        if decoded is not None and len(picked):
            dots[picked] += directions[picked] @ decoded
            view.seen[picked] = True
            joined_rounds.append(picked)
            sums.append(decoded)

    _run(population, config, view, per_round, extra=extra)
    if sums:
        gram = np.array([[a @ b for b in sums] for a in sums])
        member = np.zeros((canaries, len(sums)))
        for r, picked in enumerate(joined_rounds):
            member[picked, r] = 1.0
        norms = np.sqrt(np.maximum(np.einsum("cr,rs,cs->c", member, gram, member), 1e-300))
        view.cosines = np.where(view.seen, dots / norms, 0.0)
    view.sum_score = view.cosines.copy()
    return view


def _empty_view(present: np.ndarray, dimension: int) -> SecureView:
    m = len(present)
    return SecureView(present=np.asarray(present, dtype=bool), sum_score=np.zeros(m), own_score=np.zeros(m),
                      seen=np.zeros(m, dtype=bool), own_seen=np.zeros(m, dtype=bool), cosines=np.zeros(m),
                      dimension=dimension, epsilon={})


def _run(population: Any, config: RunConfig, view: SecureView, per_round: Any, *, extra: Any) -> None:
    """The attack federation's training rounds (as simulation/plain.py runs a secure mode, one sum per round)."""
    if config.privacy not in SECURE_MODES or not config.dp:
        raise ValueError(f"the secure-mode attacks need privacy distributed or user with DP, not {config.privacy!r}")
    devices = build_devices(config, population)
    names = sorted(devices, key=lambda d: devices[d].device_key)
    randomness = ServerRandomness.seeded(config.seed)
    server = ItemModelServer(config, initial_tables(config, population.catalogue()))
    sigma = noise_multiplier_for(config, len(devices))
    server.follow_noise(sigma, len(devices))
    share_rng = np.random.default_rng([config.seed, SHARE_SALT])
    eps = {"malicious": 0.0, "honest": 0.0, "own share": 0.0}
    for server_round in range(1, config.rounds + 1):
        chosen = sample_devices(names, config.devices_per_round, rng=randomness.for_round(server_round, 0, TRAIN_SALT),
                                poisson=config.device_sampling == "poisson")
        plan = round_plan(config, server_round, sigma)
        t_min, colluders = secure_threshold(config, {0: chosen})
        tables = server.tables
        mechanism = training_mechanism(plan, tables.num_items, tables.dim, t_min, colluders)
        grid = RecordingGridSum.zeros(mechanism)
        outcomes = train_devices([devices[d] for d in chosen], plan, tables, secure=grid, t_min=t_min,
                                 colluders=colluders)
        trained = [devices[d].device_key for d, o in zip(chosen, outcomes) if not o.declined]
        for o in outcomes:
            if not o.declined:
                for key, value in (("malicious", o.epsilon), ("honest", o.epsilon_honest),
                                   ("own share", o.epsilon_subverted)):
                    if math.isfinite(value):
                        eps[key] = max(eps[key], value)
        subjects = extra(server_round, grid, plan.update_clip) if extra is not None else trained
        decoded = mechanism.decode(grid.noised(share_rng)) if grid.count >= t_min else None
        per_round(subjects, mechanism, grid, decoded, share_rng)
        if decoded is not None:
            view.rounds_decrypted += 1
            embedding, bias = split_update(plan, decoded, tables.num_items, tables.dim)
            server.apply_sum(embedding, bias, shares=grid.count, noise_std=mechanism.sum_noise_std(grid.count),
                             population=len(devices))
        log.debug("attack round %d: %d trained, sum of %d shares", server_round, len(trained), grid.count)
    view.epsilon = eps


SUM_THREAT = "the server decrypts only sums of at least t devices (secure aggregation holds)"
OWN_THREAT = ("aggregation subverted: the server reads one device's vector with only its own noise share, "
              "1 / (t - c) of the sum's noise variance")


def secure_attack_entries(config: RunConfig, base: Population) -> list[dict[str, Any]]:
    """The secure modes' attacks in the audit-attacks.json form (simulation/attacks.py, attack_report)."""
    from . import audit_bounds as bounds
    from .attacks import ESTIMATE_MEANING, CanaryPopulation, attack_entry

    if config.privacy == "distributed":
        present = np.random.default_rng([config.seed, 0xCA4A]).random(base.num_devices) < 0.5
        log.info("attack federation (distributed): %d devices with record canaries, %d rounds", base.num_devices,
                 config.rounds)
        view = observe_record_canaries(CanaryPopulation(base, present), config)
        unit = "record"
    else:
        log.info("attack federation (user): %d devices and %d canary devices, %d rounds", base.num_devices,
                 base.num_devices, config.rounds)
        view = observe_device_canaries(base, config, canaries=base.num_devices)
        unit = "device"
    entries = [
        attack_entry(f"{unit} canaries in the decrypted sums", SUM_THREAT, scores=view.sum_score[view.seen],
                     present=view.present[view.seen], delta=config.delta, accountant=view.epsilon["honest"]),
        attack_entry(f"{unit} canaries in one device's own share", OWN_THREAT,
                     scores=view.own_score[view.own_seen], present=view.present[view.own_seen], delta=config.delta,
                     accountant=view.epsilon["own share"]),
    ]
    if config.privacy == "user":
        inserted = view.cosines[view.seen & view.present]
        threshold = 1.6449 / math.sqrt(view.dimension)  # the null N(0, 1/d)'s 95th percentile
        entries.append({
            "name": "one-shot estimate (Andrew et al. 2024)", "threat": SUM_THREAT,
            "success": {"hits": int(np.sum(inserted > threshold)), "trials": int(inserted.size),
                        "label": "inserted canaries above the null's 95th percentile"},
            "bound": bounds.one_shot_estimate(inserted, dimension=view.dimension, delta=config.delta),
            "bound_kind": "estimate", "max_bound": None, "meaning": ESTIMATE_MEANING,
            "canaries": int(view.seen.sum()), "epsilon_accountant": view.epsilon["honest"]})
    for entry in entries:
        entry["rounds_decrypted"] = view.rounds_decrypted
    return entries

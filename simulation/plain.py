"""The same federation without Flower: devices called directly in a Python loop.

It runs the server's algorithm (server/core.py) and the devices' step (shared/device.py)
exactly as the Flower app does, for the same seed and the same devices per node, so it
serves as the reference for tests, the lower bound for benchmarks, and the engine of
privacy-utility sweeps. Engine "device": one device per node, trained alone (the deployment
path); "cohort": device k lives on node k mod N, and each node trains its devices of the
round in as few Opacus passes as memory allows and sends one sum of their clipped updates.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from fedrec.server.core import (
    CENTRAL_NOISE_SALT,
    TRAIN_SALT,
    ItemModelServer,
    ServerRandomness,
    initial_tables,
    noise_multiplier_for,
    popularity_groups,
    popularity_plan,
    round_plan,
    sample_devices,
    secure_threshold,
    update_bound,
)
from fedrec.shared import protocol as P
from fedrec.shared.aggregation import PartialSum
from fedrec.shared.config import SECURE_MODES, RunConfig
from fedrec.shared.distributed_dp import GridSum, SumMechanism
from fedrec.shared.plans import LocalTrainingPlan
from fedrec.shared.popularity import PopularityPlan
from fedrec.shared.secure_release import popularity_mechanism, split_update, training_mechanism
from fedrec.shared.data.population import Population, open_population
from fedrec.shared.device import (Device, DeviceSettings, TrainOutcome, report_popularity_sum, share_seed,
                                  train_devices)
from fedrec.shared.model import ItemTables
from fedrec.shared.policy import simulated_policy
from fedrec.shared.state import MemoryStateStore

log = logging.getLogger("fedrec.simulation")
ENGINES = ("device", "cohort")


def node_count(config: RunConfig, population: int, *, cpus: int | None = None) -> int:
    """Simulated nodes: one per device, or (cohort) `simulation-shards`, by default one per CPU."""
    if config.simulation_engine == "device":
        return population
    shards = config.simulation_shards or cpus or os.cpu_count() or 1
    return max(1, min(shards, population))


@dataclass
class PlainResult:
    tables: ItemTables  # as devices rank with them (shrunk by their known noise when enabled)
    noise_multiplier: float
    epsilon: dict[str, float] = field(default_factory=dict)  # latest cumulative epsilon per device that trained
    declined: set[str] = field(default_factory=set)
    round_seconds: list[float] = field(default_factory=list)
    round_trained: list[int] = field(default_factory=list)  # devices that trained in each round


def build_devices(config: RunConfig, population: Population) -> dict[str, Device]:
    settings = DeviceSettings(embedding_dim=config.embedding_dim, init_scale=config.init_scale, seed=config.seed)
    policy = simulated_policy(config)
    return {f"sim-{k}": Device(f"sim-{k}", k, partial(population.device_events, k), MemoryStateStore(), settings,
                               policy) for k in range(population.num_devices)}


Observer = Callable[[int, dict], None]  # (server round, device -> (embedding delta, bias delta)) as the server sees it


def run_plain(config: RunConfig, *, engine: str | None = None, population: Population | None = None,
              nodes: int | None = None, observe: Observer | None = None) -> PlainResult:
    """Run the federation (engine and nodes as `fedrec simulate` would choose them, unless given).

    `observe` sees every round's per-device updates, as the server would with one device per node (attacks).
    """
    engine = engine or config.simulation_engine
    if engine not in ENGINES:
        raise ValueError(f"engine '{engine}': expected one of {ENGINES}")
    population = population or open_population(config)
    nodes = nodes or node_count(config.replace(simulation_engine=engine), population.num_devices)
    devices = build_devices(config, population)
    randomness = ServerRandomness.seeded(config.seed)  # a simulation: reproducible, as a fresh Flower run (attempt 0)
    catalogue = population.catalogue()
    server = ItemModelServer(config, initial_tables(config, catalogue),
                             list(catalogue.categories) if catalogue.categories else None)
    result = PlainResult(tables=server.tables, noise_multiplier=noise_multiplier_for(config, len(devices)))
    server.follow_noise(result.noise_multiplier, len(devices))
    prior = popularity_plan(config)
    secure = config.privacy in SECURE_MODES
    if prior is not None and secure:
        _secure_popularity(config, prior, devices, nodes, server, result, population.num_items)
    elif prior is not None:
        parts = []
        for group in _by_node(sorted(devices), devices, nodes):
            outcomes, counts = report_popularity_sum([devices[d] for d in group], prior, population.num_items)
            result.epsilon.update((d, o.epsilon) for d, o in zip(group, outcomes))
            if counts is not None:
                parts.append((counts.astype(np.float32), sum(not o.declined for o in outcomes)))
        server.set_popularity(parts, noise_multiplier=prior.noise_multiplier)
    for server_round in range(1, config.rounds + 1):
        started = time.perf_counter()
        chosen = sample_devices(devices, config.devices_per_round, rng=randomness.for_round(server_round, 0, TRAIN_SALT),
                                poisson=config.device_sampling == "poisson")
        plan = round_plan(config, server_round, result.noise_multiplier, server.head)
        if secure:  # the server sees sums only: nothing per device to observe
            trained = _secure_round(config, plan, chosen, devices, nodes, server, result)
            if observe is not None:
                observe(server_round, {})
            result.round_seconds.append(time.perf_counter() - started)
            result.round_trained.append(trained)
            continue
        trained = plan.trained_items(population.num_items)
        total = PartialSum.zeros(trained, config.embedding_dim)
        bound = update_bound(config, plan, trained, config.embedding_dim)
        seen: dict = {}
        for group in _by_node(chosen, devices, nodes):
            node_sum = PartialSum.zeros(trained, config.embedding_dim)
            if observe is None:  # as a node does: each update clipped into the node's sum as its cohort finishes
                _collect(group, train_devices([devices[d] for d in group], plan, server.tables, into=node_sum,
                                              delta_clip=bound, head=server.head), result)
            else:
                updates = _collect(group, train_devices([devices[d] for d in group], plan, server.tables,
                                                        head=server.head), result)
                for device in group:
                    if device in updates:
                        node_sum.add(updates[device], clip=bound)
                seen.update({d: server.scatter(*u) for d, u in updates.items()})  # in catalogue rows
            total.merge(as_sent(node_sum))
        if observe is not None:
            observe(server_round, seen)
        server.apply(total, plan, rng=randomness.for_round(server_round, 0, CENTRAL_NOISE_SALT),
                     population=len(devices))
        result.round_seconds.append(time.perf_counter() - started)
        result.round_trained.append(total.count)
        log.debug("plain round %d: %d trained in %.2fs", server_round, total.count, result.round_seconds[-1])
    result.tables = server.serving_tables()
    return result


def _modelled_sum(groups: list[list[str]], devices: dict[str, Device], mechanism: SumMechanism, server_round: int,
                  run: Callable[[list[Device], GridSum], list[TrainOutcome]],
                  result: PlainResult) -> tuple[np.ndarray | None, int]:
    """A modelled secure sum as the cohort engine's nodes and the server make it: each node's grid sum plus its
    devices' noise shares (seeded as the ClientApp seeds them), added up; None if fewer than t shares."""
    total, shares = np.zeros(mechanism.dimension, dtype=np.int64), 0
    for group in groups:
        members = [devices[d] for d in group]
        grid = GridSum.zeros(mechanism)
        outcomes = run(members, grid)
        for device, outcome in zip(group, outcomes):
            result.epsilon[device] = outcome.epsilon
            if outcome.declined:
                result.declined.add(device)
        if grid.count:
            total += grid.noised(np.random.default_rng(share_seed(members, server_round, 0)))
            shares += grid.count
    return (mechanism.decode(total) if shares >= mechanism.t_min else None), shares


def _secure_popularity(config: RunConfig, prior: PopularityPlan, devices: dict[str, Device], nodes: int,
                       server: ItemModelServer, result: PlainResult, num_items: int) -> None:
    asked = {k: group for k, group in enumerate(_by_node(sorted(devices), devices, nodes))}
    total, reports, variance = np.zeros(num_items), 0, 0.0
    for group in popularity_groups(asked, config.devices_per_round):
        mechanism = popularity_mechanism(prior, num_items, *secure_threshold(config, group))
        decoded, shares = _modelled_sum(
            list(group.values()), devices, mechanism, prior.server_round,
            lambda members, grid: report_popularity_sum(members, prior, num_items, secure=grid,
                                                        t_min=mechanism.t_min, colluders=mechanism.colluders)[0],
            result)
        if decoded is not None:
            total, reports = total + decoded, reports + shares
            variance += mechanism.sum_noise_std(shares) ** 2
    if reports:
        server.set_popularity_from_sum(total, reports=reports, noise_std=float(np.sqrt(variance)))


def _secure_round(config: RunConfig, plan: LocalTrainingPlan, chosen: list[str], devices: dict[str, Device],
                  nodes: int, server: ItemModelServer, result: PlainResult) -> int:
    groups = _by_node(chosen, devices, nodes)
    t_min, colluders = secure_threshold(config, dict(enumerate(groups)))
    tables = server.tables
    mechanism = training_mechanism(plan, tables.num_items, tables.dim, t_min, colluders)
    decoded, shares = _modelled_sum(groups, devices, mechanism, plan.server_round,
                                    lambda members, grid: train_devices(members, plan, tables, secure=grid,
                                                                        t_min=t_min, colluders=colluders,
                                                                        head=server.head), result)
    if decoded is not None:
        embedding, bias = split_update(plan, decoded, tables.num_items, tables.dim)
        server.apply_sum(embedding, bias, shares=shares, noise_std=mechanism.sum_noise_std(shares),
                         population=len(devices))
    return shares


def _collect(chosen: list[str], outcomes: list[TrainOutcome], result: PlainResult) -> dict:
    updates = {}
    for device, outcome in zip(chosen, outcomes):
        result.epsilon[device] = outcome.epsilon
        if outcome.declined:
            result.declined.add(device)
        else:
            updates[device] = (outcome.embedding_delta, outcome.bias_delta)
    return updates


def _by_node(chosen: list[str], devices: dict[str, Device], nodes: int) -> list[list[str]]:
    """A round's devices grouped as the server asks the nodes: in id order, nodes by their first device."""
    groups: dict[int, list[str]] = {}
    for device in chosen:
        groups.setdefault(devices[device].device_key % nodes, []).append(device)
    return sorted(groups.values(), key=lambda group: group[0])


def as_sent(node_sum: PartialSum) -> PartialSum:
    """A node's sum as the server receives it: float32 on the wire."""
    emb, bias = (a.astype(np.float64) for a in P.delta_to_arrays(node_sum.embedding, node_sum.bias).values())
    return PartialSum(emb, bias, count=node_sum.count, clipped=node_sum.clipped)

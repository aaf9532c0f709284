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
    popularity_plan,
    round_plan,
    sample_devices,
    update_bound,
)
from fedrec.shared import protocol as P
from fedrec.shared.aggregation import PartialSum
from fedrec.shared.config import RunConfig
from fedrec.shared.data.population import Population, open_population
from fedrec.shared.device import Device, DeviceSettings, TrainOutcome, report_popularity_sum, train_devices
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
    server = ItemModelServer(config, initial_tables(config, population.catalogue()))
    result = PlainResult(tables=server.tables, noise_multiplier=noise_multiplier_for(config, len(devices)))
    prior = popularity_plan(config)
    if prior is not None:
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
        plan = round_plan(config, server_round, result.noise_multiplier)
        total = PartialSum.zeros(population.num_items, config.embedding_dim)
        bound = update_bound(config, plan, population.num_items, config.embedding_dim)
        seen: dict = {}
        for group in _by_node(chosen, devices, nodes):
            node_sum = PartialSum.zeros(population.num_items, config.embedding_dim)
            if observe is None:  # as a node does: each update clipped into the node's sum as its cohort finishes
                _collect(group, train_devices([devices[d] for d in group], plan, server.tables, into=node_sum,
                                              delta_clip=bound), result)
            else:
                updates = _collect(group, train_devices([devices[d] for d in group], plan, server.tables), result)
                for device in group:
                    if device in updates:
                        node_sum.add(updates[device], clip=bound)
                seen.update(updates)
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

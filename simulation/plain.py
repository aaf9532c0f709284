"""The same federation without Flower: devices called directly in a Python loop.

It runs the server's algorithm (server/core.py) and the devices' step (shared/device.py)
exactly as the Flower app does, for the same seed, so it serves as the reference for
tests, the lower bound for benchmarks, and the engine of privacy-utility sweeps.
engine="device" trains one device at a time (the deployment path); engine="cohort" trains
each round's devices in as few Opacus passes as memory allows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server.core import (
    TRAIN_SALT,
    ItemModelServer,
    initial_tables,
    noise_multiplier_for,
    popularity_plan,
    round_plan,
    sample_devices,
)
from shared.config import RunConfig
from shared.data.population import Population, open_population
from shared.device import Device, DevicePolicy, TrainOutcome, train_devices
from shared.model import ItemTables
from shared.state import MemoryStateStore

log = logging.getLogger("fedrec.simulation")
ENGINES = ("device", "cohort")


@dataclass
class PlainResult:
    tables: ItemTables  # as devices rank with them (shrunk by their known noise when enabled)
    noise_multiplier: float
    epsilon: dict[str, float] = field(default_factory=dict)  # latest cumulative epsilon per device that trained
    declined: set[str] = field(default_factory=set)
    round_seconds: list[float] = field(default_factory=list)


def build_devices(config: RunConfig, population: Population) -> dict[str, Device]:
    policy = DevicePolicy(epsilon_budget=config.epsilon_budget, embedding_dim=config.embedding_dim,
                          init_scale=config.init_scale, seed=config.seed)
    return {f"sim-{k}": Device(f"sim-{k}", k, population.device_events(k), MemoryStateStore(), policy)
            for k in range(population.num_devices)}


Observer = Callable[[int, dict], None]  # (server round, device -> (embedding delta, bias delta)) as the server sees it


def run_plain(config: RunConfig, *, engine: str = "cohort", population: Population | None = None,
              observe: Observer | None = None) -> PlainResult:
    """Run the federation; `observe` sees every round's per-device updates, as the server does (for attacks)."""
    if engine not in ENGINES:
        raise ValueError(f"engine '{engine}': expected one of {ENGINES}")
    population = population or open_population(config)
    devices = build_devices(config, population)
    server = ItemModelServer(config, initial_tables(config, population.catalogue()))
    result = PlainResult(tables=server.tables, noise_multiplier=noise_multiplier_for(config, len(devices)))
    prior = popularity_plan(config)
    if prior is not None:
        reports = {}
        for device_id in sorted(devices):
            outcome, counts = devices[device_id].report_popularity(prior, population.num_items)
            result.epsilon[device_id] = outcome.epsilon
            if counts is not None:
                reports[device_id] = counts
        if reports:
            total = np.sum(np.stack([reports[d] for d in sorted(reports)]), axis=0, dtype=np.float64)
            server.set_popularity(total, reports=len(reports), noise_multiplier=prior.noise_multiplier)
    for server_round in range(1, config.rounds + 1):
        started = time.perf_counter()
        chosen = sample_devices(devices, config.devices_per_round, seed=config.seed, server_round=server_round,
                                salt=TRAIN_SALT, poisson=config.device_sampling == "poisson")
        plan = round_plan(config, server_round, result.noise_multiplier)
        if engine == "cohort":
            outcomes = train_devices([devices[d] for d in chosen], plan, server.tables)
        else:
            outcomes = [devices[d].train(plan, server.tables) for d in chosen]
        updates = _collect(chosen, outcomes, result)
        if observe is not None:
            observe(server_round, updates)
        server.apply(server.sum_updates(updates), plan)
        result.round_seconds.append(time.perf_counter() - started)
        log.debug("plain round %d: %d trained in %.2fs", server_round, len(updates), result.round_seconds[-1])
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

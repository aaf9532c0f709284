"""The simulated population a run draws its devices from: synthetic, or a prepared folder."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..config import ConfigError, RunConfig
from .catalogue import Catalogue
from .interactions import DeviceEvents, DeviceSplit, split_device
from .prepared import PreparedData
from .synthetic import SyntheticSpec


class Population(Protocol):
    num_devices: int
    num_items: int

    def device_events(self, k: int) -> DeviceEvents: ...

    def catalogue(self) -> Catalogue: ...


class SyntheticPopulation:
    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        self.num_devices = spec.num_devices
        self.num_items = spec.num_items

    def device_events(self, k: int) -> DeviceEvents:
        return self.spec.device_events(k)

    def catalogue(self) -> Catalogue:
        topics = tuple(f"topic-{t}" for t in self.spec.item_topic)
        return Catalogue(item_ids=tuple(str(i) for i in range(self.num_items)),
                         titles=tuple(f"Synthetic item {i} ({topics[i]})" for i in range(self.num_items)),
                         categories=topics)


class PopulationSubset:
    """A seeded random subset of a larger population (``devices`` smaller than the data set)."""

    def __init__(self, base: Population, size: int, *, seed: int) -> None:
        rng = np.random.default_rng([seed, 0x5B5E7])
        self.base = base
        self.indices = np.sort(rng.choice(base.num_devices, size=size, replace=False))
        self.num_devices = size
        self.num_items = base.num_items

    def device_events(self, k: int) -> DeviceEvents:
        return self.base.device_events(int(self.indices[k]))

    def catalogue(self) -> Catalogue:
        return self.base.catalogue()


def shard_members(num_devices: int, shard: int, shards: int) -> range:
    """The devices a simulated node hosts: device k lives on node k mod shards (one each when shards = devices)."""
    if not 0 <= shard < shards:
        raise ConfigError(f"node partition-id {shard} is outside 0..{shards - 1} (num-partitions {shards})")
    return range(shard, num_devices, shards)


def synthetic_spec(config: RunConfig) -> SyntheticSpec:
    return SyntheticSpec(num_devices=config.devices, num_items=config.synthetic_items,
                         num_topics=config.synthetic_topics, mean_events=config.synthetic_mean_events,
                         popularity_skew=config.synthetic_popularity_skew,
                         taste_share=config.synthetic_taste_share, seed=config.seed)


def open_population(config: RunConfig) -> Population:
    """The devices of a simulation (synthetic or prepared); raw formats must be prepared first."""
    if config.dataset == "synthetic":
        if config.devices < 1:
            raise ConfigError("devices: a synthetic population needs devices >= 1")
        return SyntheticPopulation(synthetic_spec(config))
    if config.dataset != "prepared":
        raise ConfigError(f"dataset '{config.dataset}': the Flower app reads 'synthetic' or 'prepared' data; run "
                          f"'fedrec prepare --dataset {config.dataset} --data-path ... --out DIR' and pass "
                          "dataset='prepared' data-path=DIR (fedrec simulate does this for you)")
    prepared = PreparedData(config.data_path)
    if 0 < config.devices < prepared.num_devices:
        return PopulationSubset(prepared, config.devices, seed=config.seed)
    return prepared


def population_splits(population: Population) -> list[DeviceSplit]:
    """Every device's split, in device order; devices too short to split are an error (prepare filters them)."""
    splits = []
    for k in range(population.num_devices):
        split = split_device(population.device_events(k))
        if split is None:
            raise ConfigError(f"device {k} has fewer than 3 distinct items; prepare the data with a minimum history")
        splits.append(split)
    return splits


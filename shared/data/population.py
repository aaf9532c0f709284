"""Simulated populations (synthetic or prepared) and the public catalogue alone, all a deployed server reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from ..config import ConfigError, RunConfig
from .catalogue import Catalogue
from .interactions import DeviceEvents, DeviceSplit, split_device
from .prepared import (
    CATALOGUE,
    MANIFEST,
    SERVER_FOLDER,
    SERVER_KIND,
    PreparedData,
    prepared_device_count,
    read_server_folder,
)
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
        return synthetic_catalogue(self.spec)


def synthetic_catalogue(spec: SyntheticSpec) -> Catalogue:
    """The synthetic catalogue: a function of the seed and the catalogue's shape only, never of a device's events."""
    topics = tuple(f"topic-{t}" for t in spec.item_topic)
    return Catalogue(item_ids=tuple(str(i) for i in range(spec.num_items)),
                     titles=tuple(f"Synthetic item {i} ({topics[i]})" for i in range(spec.num_items)),
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
    return SyntheticSpec(num_devices=config.synthetic_devices, num_items=config.synthetic_items,
                         num_topics=config.synthetic_topics, mean_events=config.synthetic_mean_events,
                         popularity_skew=config.synthetic_popularity_skew,
                         taste_share=config.synthetic_taste_share, seed=config.seed)


def _check_app_dataset(config: RunConfig) -> None:
    if config.dataset not in ("synthetic", "prepared"):
        raise ConfigError(f"dataset '{config.dataset}': the Flower app reads 'synthetic' or 'prepared' data; run "
                          f"'fedrec prepare --dataset {config.dataset} --data-path ... --out DIR' and pass "
                          "dataset='prepared' data-path=DIR (fedrec simulate does this for you)")


def open_population(config: RunConfig) -> Population:
    """The devices of a simulation (synthetic or prepared); raw formats must be prepared first."""
    _check_app_dataset(config)
    if config.dataset == "synthetic":
        return SyntheticPopulation(synthetic_spec(config))
    prepared = PreparedData(config.data_path)
    if 0 < config.devices < prepared.num_devices:
        return PopulationSubset(prepared, config.devices, seed=config.seed)
    return prepared


def simulated_device_count(config: RunConfig) -> int:
    """How many devices open_population(config) holds, without reading or generating any device's events."""
    _check_app_dataset(config)
    if config.dataset == "synthetic":
        return config.synthetic_devices
    total = prepared_device_count(Path(config.data_path))
    return config.devices if 0 < config.devices < total else total


def open_catalogue(config: RunConfig, *, deployed: bool) -> Catalogue:
    """The public catalogue of a run, reading nothing per device.

    Synthetic: generated from the seed. Prepared: deployed, data-path must be a server folder (catalogue.csv
    and a manifest, nothing else); in a simulation it may also be the prepared folder (its catalogue.csv).
    """
    _check_app_dataset(config)
    if config.dataset == "synthetic":
        return synthetic_catalogue(synthetic_spec(config))
    path = Path(config.data_path)
    if not config.data_path:
        raise ConfigError("data-path: dataset 'prepared' needs data-path, the folder written by 'fedrec prepare' "
                          f"(in deployment its {SERVER_FOLDER}/ subfolder)")
    if deployed or _is_server_folder(path):
        return read_server_folder(path)[0]
    return Catalogue.read_csv(path / CATALOGUE)  # simulation: the public file alone, not the event arrays


def _is_server_folder(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("kind") == SERVER_KIND
    except (OSError, ValueError, AttributeError):
        return False


def population_splits(population: Population) -> list[DeviceSplit]:
    """Every device's split, in device order; devices too short to split are an error (prepare filters them)."""
    splits = []
    for k in range(population.num_devices):
        split = split_device(population.device_events(k))
        if split is None:
            raise ConfigError(f"device {k} has fewer than 3 distinct items; prepare the data with a minimum history")
        splits.append(split)
    return splits


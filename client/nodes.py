"""Which devices a Flower node hosts: a shard of a simulated population, or one real device."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ConfigRecord, Context, RecordDict

from fedrec.shared import protocol as P
from fedrec.shared.config import ConfigError, RunConfig
from fedrec.shared.data.catalogue import Catalogue
from fedrec.shared.data.interactions import DeviceEvents
from fedrec.shared.data.population import open_population, shard_members
from fedrec.shared.device import Device, DeviceSettings
from fedrec.shared.policy import PrivacyPolicy, read_policy_file, simulated_policy
from fedrec.shared.model import ItemTables
from fedrec.shared.state import DeviceState, FileStateStore, SlotStateStore, atomic_write, save_item_model

STATE_RECORD = "fedrec-device-state"
DEPLOYED_KEYS = ("data-path", "catalogue-path", "state-path")
OPTIONAL_KEYS = ("device-id", "policy-path")
STATE_FILE, MODEL_FILE, NODE_FILE = "state.json", "item-model.npz", "node.json"


class Node(Protocol):
    num_items: int

    def device_ids(self) -> list[str]: ...

    def devices(self, content: RecordDict) -> list[Device]: ...

    def received(self, tables: ItemTables, server_round: int) -> None: ...


def open_node(context: Context, config: RunConfig) -> Node:
    """A simulated node (Flower's simulation engine gives it a partition-id) or a deployed device."""
    if "partition-id" in context.node_config:
        return SimulatedNode(context, config)
    if any(key in context.node_config for key in DEPLOYED_KEYS):
        return DeployedNode(context, config)
    raise ConfigError("node config: neither 'partition-id' (simulation) nor data-path/catalogue-path/state-path "
                      "(a deployed device: flower-supernode --node-config 'data-path=\"...\" ...')")


def _wanted(content: RecordDict, hosted: dict[str, int]) -> list[str]:
    """The device ids a request names; each must live on this node."""
    if P.COHORT not in content:
        raise P.ProtocolError("request has no cohort record naming its devices")
    wanted = P.device_ids(content[P.COHORT], "cohort")
    strangers = [d for d in wanted if d not in hosted]
    if not wanted:
        raise P.ProtocolError("cohort names no devices")
    if strangers:
        raise P.ProtocolError(f"cohort names devices {strangers} that this node does not host")
    return wanted


class ContextStateStore:
    """A device's state inside Flower's Context.state (lives as long as the simulation runs)."""

    def __init__(self, context: Context, device_id: str) -> None:
        self.context = context
        self.key = f"{STATE_RECORD}.{device_id}"

    def load(self) -> DeviceState | None:
        record = self.context.state.get(self.key)
        if record is None:
            return None
        return DeviceState.from_bytes(record["state"], source="Context.state")

    def save(self, state: DeviceState) -> None:
        self.context.state[self.key] = ConfigRecord({"state": state.to_bytes()})


class SimulatedNode:
    """The devices a simulated node hosts: one (device engine) or a shard of the population (cohort engine)."""

    def __init__(self, context: Context, config: RunConfig) -> None:
        shard = int(context.node_config["partition-id"])
        shards = int(context.node_config.get("num-partitions", shard + 1))
        self.context, self.config = context, config
        self.population = open_population(config)
        self.num_items = self.population.num_items
        self.keys = {f"sim-{k}": k for k in shard_members(self.population.num_devices, shard, shards)}
        self.policy = simulated_policy(config)
        # Only the cohort engine models secure sums (a node speaks for many devices there); everywhere else a
        # device in a secure mode sends nothing outside the real protocol.
        self.models_secure_sums = config.simulation_engine == "cohort"

    def device_ids(self) -> list[str]:
        return sorted(self.keys, key=self.keys.__getitem__)

    def devices(self, content: RecordDict) -> list[Device]:
        return [self._device(d) for d in _wanted(content, self.keys)]

    def received(self, tables: ItemTables, server_round: int) -> None:
        """Simulated devices keep no copy of the model (the run directory has the checkpoint)."""

    def _device(self, device_id: str) -> Device:
        cfg = self.config
        store = (SlotStateStore(Path(cfg.state_dir), device_id) if cfg.state_dir
                 else ContextStateStore(self.context, device_id))
        settings = DeviceSettings(embedding_dim=cfg.embedding_dim, init_scale=cfg.init_scale, seed=cfg.seed)
        key = self.keys[device_id]
        return Device(device_id, key, lambda: self.population.device_events(key), store, settings, self.policy)


def _read_device_file(path: Path, *, num_items: int) -> DeviceEvents:
    """The device's events, read once a plan has passed its policy and budget (the hello never reads them)."""
    from fedrec.shared.data.prepare import read_device_file  # with the raw-log readers (pandas): not for a hello

    return read_device_file(path, num_items=num_items)


def deployed_policy(node_config: dict[str, Any]) -> PrivacyPolicy:
    """A deployed device's policy: its policy file (policy-path), then policy keys in its node config.

    Never the run config: the server chooses that, and the device does not trust the server's plans.
    """
    settings: dict[str, Any] = {}
    if "policy-path" in node_config:
        settings.update(read_policy_file(Path(str(node_config["policy-path"]))))
    settings.update({k: v for k, v in node_config.items() if k in PrivacyPolicy.keys()})
    return PrivacyPolicy.from_mapping(settings, source="node config")


class DeployedNode:
    """One real device (a SuperNode): its own events file, the public catalogue and a state folder.

    Node config: data-path (its events, as `fedrec prepare` writes them per device), catalogue-path,
    state-path (a folder: the device state and the latest item model it received, written
    atomically and flushed to disk), device-id (optional; default: the data file's name), and its
    privacy policy (shared/policy.py): policy keys in the node config and/or policy-path, a TOML
    file of them. The events file is read only for a plan that passed the policy and the budget.
    Its randomness (sampling, negatives, DP noise) is seeded from the operating system's entropy
    at start, so the server cannot predict the noise, unlike a simulation's seeded runs.
    """

    def __init__(self, context: Context, config: RunConfig) -> None:
        node_config = dict(context.node_config)
        missing = [key for key in DEPLOYED_KEYS if key not in node_config]
        if missing:
            raise ConfigError(f"node config: missing {missing}; a deployed device needs "
                              f"{', '.join(DEPLOYED_KEYS)}")
        unknown = sorted(set(node_config) - {*DEPLOYED_KEYS, *OPTIONAL_KEYS, *PrivacyPolicy.keys()})
        if unknown:
            raise ConfigError(f"node config: unknown key(s) {unknown}; known: {[*DEPLOYED_KEYS, *OPTIONAL_KEYS]} "
                              f"and the privacy policy keys {PrivacyPolicy.keys()}")
        data_path = Path(str(node_config["data-path"]))
        catalogue_path = Path(str(node_config["catalogue-path"]))
        self.state_dir = Path(str(node_config["state-path"]))
        self.catalogue = Catalogue.read_csv(catalogue_path)
        self.num_items = self.catalogue.num_items
        self.device_id = str(node_config.get("device-id", data_path.stem))
        settings = DeviceSettings(embedding_dim=config.embedding_dim, init_scale=config.init_scale,
                                  seed=secrets.randbits(62))
        store = FileStateStore(self.state_dir / STATE_FILE)
        self.device = Device(self.device_id, secrets.randbits(31),
                             lambda: _read_device_file(data_path, num_items=self.num_items), store, settings,
                             deployed_policy(node_config))
        # Where this device's data lives, for `fedrec recommend` on the device.
        described = json.dumps({"device-id": self.device_id, "data-path": str(data_path.resolve()),
                                "catalogue-path": str(catalogue_path.resolve())},
                               indent=2).encode()
        node_file = self.state_dir / NODE_FILE
        if not node_file.exists() or node_file.read_bytes() != described:
            atomic_write(node_file, described)

    def device_ids(self) -> list[str]:
        return [self.device_id]

    def devices(self, content: RecordDict) -> list[Device]:
        _wanted(content, {self.device_id: 0})
        return [self.device]

    def received(self, tables: ItemTables, server_round: int) -> None:
        if tables.num_items != self.num_items:
            raise P.ProtocolError(f"the item model has {tables.num_items} items, the catalogue "
                                  f"{self.num_items}")
        save_item_model(self.state_dir / MODEL_FILE, tables, server_round=server_round)

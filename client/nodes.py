"""Which devices a Flower node hosts: a shard of a simulated population, or one real device."""

from __future__ import annotations

import contextlib
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
from fedrec.shared.state import (DeviceState, FileStateStore, SlotStateStore, atomic_write, file_lock,
                                 in_process_lock, save_item_model)

STATE_RECORD = "fedrec-device-state"
DEPLOYED_KEYS = ("data-path", "catalogue-path", "state-path", "device-id")
OPTIONAL_KEYS = ("policy-path", "identity-key", "identity-cert")
STATE_FILE, MODEL_FILE, NODE_FILE = "state.json", "item-model.npz", "node.json"


Enrolment = tuple[Any, Any]  # (DeviceIdentity, the pinned authority's Ed25519PublicKey); see shared/identity.py
SESSION_STATE = "fedrec-secagg-session"  # simulation: the Context state record of a device's secure-sum session
SESSION_FILE = "secagg-session.json"  # deployment: the session file in the device's state folder


class SessionStore:
    """Where a device keeps its secure-sum session between stages, loaded, advanced and saved under `locked()`.

    A deployed device keeps it in a file of its own state folder, behind an flock: Flower hands every task a
    snapshot of the node's Context and writes it back when the task ends, so two tasks racing on one device
    would both start from one snapshot (and could both pass one stage) if the session lived there. A simulated
    device (the experimenter runs the server too) keeps it in Context.state, under the process's lock.
    """

    def __init__(self, *, context: Context | None = None, path: Path | None = None) -> None:
        self.context, self.path = context, path

    def locked(self) -> contextlib.AbstractContextManager[object]:
        if self.path is None:
            return in_process_lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return file_lock(self.path.with_name(self.path.name + ".lock"))

    def load(self) -> tuple[Any, dict[str, Any]] | None:
        from fedrec.shared.secagg import ClientSession, SecAggError

        if self.path is None:
            assert self.context is not None
            if SESSION_STATE not in self.context.state:
                return None
            record = dict(self.context.state[SESSION_STATE])
        else:
            try:
                record = json.loads(self.path.read_bytes())
                record["session"] = bytes.fromhex(record["session"])
            except FileNotFoundError:
                return None
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise SecAggError(f"unreadable secure-sum session ({type(err).__name__})") from None
        return ClientSession.from_bytes(record.pop("session")), record

    def save(self, session: Any, **extra: Any) -> None:
        if self.path is None:
            assert self.context is not None
            self.context.state[SESSION_STATE] = ConfigRecord({"session": session.to_bytes(), **extra})
            return
        atomic_write(self.path, json.dumps({"session": session.to_bytes().hex(), **extra}).encode(), mode=0o600)

    def clear(self) -> None:
        if self.path is None:
            assert self.context is not None
            self.context.state.pop(SESSION_STATE, None)
        else:
            self.path.unlink(missing_ok=True)


class Node(Protocol):
    num_items: int

    def device_ids(self) -> list[str]: ...

    def enrolment(self, device_id: str) -> Enrolment | None: ...

    def session_store(self, context: Context) -> SessionStore: ...

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

    def locked(self) -> contextlib.AbstractContextManager[object]:
        return in_process_lock()


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

    def session_store(self, context: Context) -> SessionStore:
        return SessionStore(context=context)

    def enrolment(self, device_id: str) -> Enrolment:
        """A simulated device's identity, issued by an authority derived from the run's seed (the experimenter
        owns every device); it pins that authority unless its policy names another."""
        from fedrec.shared.identity import Authority, DeviceIdentity, authority_key_from_hex

        seed = str(self.config.seed).encode()
        authority = Authority.from_seed(seed)
        pinned = authority_key_from_hex(self.policy.enrolment_authority or authority.public_hex,
                                        source="run config device-policy")
        return DeviceIdentity.simulated(device_id, authority, seed), pinned

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
    atomically and flushed to disk), device-id (required: unique, the subject of its enrolment
    certificate), identity-key and identity-cert (its enrolled signing key and certificate, from
    `fedrec enrol device`: needed for the secure modes), and its privacy policy (shared/policy.py):
    policy keys in the node config and/or policy-path, a TOML file of them (enrolment-authority pins
    the authority it trusts). The events file is read only for a plan that passed the policy and the budget.
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
        # The device id is its secure-aggregation participant id and the subject of its certificate: unique, and
        # given explicitly (never derived from a file name, which two devices may share).
        self.device_id = str(node_config["device-id"]).strip()
        if not self.device_id:
            raise ConfigError("node config: device-id is empty; give each device its unique id (the subject of "
                              "its enrolment certificate)")
        self.identity_paths = (node_config.get("identity-key"), node_config.get("identity-cert"))
        if (self.identity_paths[0] is None) != (self.identity_paths[1] is None):
            raise ConfigError("node config: identity-key and identity-cert go together (fedrec enrol device "
                              "writes both)")
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

    def session_store(self, context: Context) -> SessionStore:
        return SessionStore(path=self.state_dir / SESSION_FILE)

    def enrolment(self, device_id: str) -> Enrolment | None:
        """Its identity files and the authority its policy pins, or None where either is missing (it then refuses
        every secure-sum plan by the rule 'enrolment', before committing). A certificate for another device id,
        another key or another authority is an error, never used."""
        from fedrec.shared.identity import DeviceIdentity, IdentityError, authority_key_from_hex

        key_path, cert_path = self.identity_paths
        if key_path is None or not self.device.policy.enrolment_authority:
            return None
        try:
            pinned = authority_key_from_hex(self.device.policy.enrolment_authority, source="device policy")
            identity = DeviceIdentity.read(Path(str(key_path)), Path(str(cert_path)), authority=pinned)
        except IdentityError as err:
            raise ConfigError(f"node config: {err}") from None
        if identity.device_id != self.device_id:
            raise ConfigError(f"node config: the certificate {cert_path} is issued to {identity.device_id!r}, this "
                              f"device is {self.device_id!r}")
        return identity, pinned

    def received(self, tables: ItemTables, server_round: int) -> None:
        if tables.num_items != self.num_items:
            raise P.ProtocolError(f"the item model has {tables.num_items} items, the catalogue "
                                  f"{self.num_items}")
        save_item_model(self.state_dir / MODEL_FILE, tables, server_round=server_round)

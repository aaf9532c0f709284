"""Flower ClientApp: unpack a message, run the step of the devices it names (shared.device), pack the reply."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from shared import protocol as P
from shared.config import ConfigError, RunConfig
from shared.data.interactions import DataError
from shared.aggregation import PartialSum
from shared.data.population import open_population, shard_members
from shared.device import Device, DevicePolicy, TrainOutcome, report_popularity_sum, train_devices
from shared.popularity import PopularityPlan
from shared.state import DeviceState, FileStateStore, StateError
from shared.training import LocalTrainingPlan, PlanError

log = logging.getLogger("fedrec.client")

# Errors with a clear message for the server's log; anything else is a bug and propagates.
EXPECTED_ERRORS = (ConfigError, DataError, PlanError, P.ProtocolError, StateError)
DEVICE_ERROR_CODE = 100
STATE_RECORD = "fedrec-device-state"


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
        if "partition-id" not in context.node_config:
            raise ConfigError("node config: no 'partition-id'; simulated devices get it from Flower's simulation "
                              "engine")
        shard = int(context.node_config["partition-id"])
        shards = int(context.node_config.get("num-partitions", shard + 1))
        self.context, self.config = context, config
        self.population = open_population(config)
        self.keys = {f"sim-{k}": k for k in shard_members(self.population.num_devices, shard, shards)}

    def device_ids(self) -> list[str]:
        return sorted(self.keys, key=self.keys.__getitem__)

    def devices(self, cohort: RecordDict) -> list[Device]:
        """The devices a request names; each must live on this node."""
        if P.COHORT not in cohort:
            raise P.ProtocolError("request has no cohort record naming its devices")
        wanted = P.device_ids(cohort[P.COHORT], "cohort")
        strangers = [d for d in wanted if d not in self.keys]
        if not wanted:
            raise P.ProtocolError("cohort names no devices")
        if strangers:
            raise P.ProtocolError(f"cohort names devices {strangers} that this node does not host")
        return [self._device(d) for d in wanted]

    def _device(self, device_id: str) -> Device:
        cfg = self.config
        store = (FileStateStore(Path(cfg.state_dir) / f"{device_id}.json", durable=False) if cfg.state_dir
                 else ContextStateStore(self.context, device_id))
        policy = DevicePolicy(epsilon_budget=cfg.epsilon_budget, embedding_dim=cfg.embedding_dim,
                              init_scale=cfg.init_scale, seed=cfg.seed)
        key = self.keys[device_id]
        return Device(device_id, key, self.population.device_events(key), store, policy)


def _arrays(record: ArrayRecord) -> dict:
    return {key: array.numpy() for key, array in record.items()}


def _devices_record(devices: list[Device]) -> ConfigRecord:
    return ConfigRecord({P.DEVICE_IDS: [d.device_id for d in devices]})


def _report(outcomes: list[TrainOutcome], clipped: int = 0) -> MetricRecord:
    return MetricRecord({"declined": [int(o.declined) for o in outcomes],
                         "epsilon": [float(o.epsilon) for o in outcomes], "clipped": clipped})


def handle_train(message: Message, context: Context, config: RunConfig) -> Message:
    devices = SimulatedNode(context, config).devices(message.content)
    plan = LocalTrainingPlan.from_config(dict(message.content[P.PLAN]))
    tables = P.tables_from_arrays(_arrays(message.content[P.TABLES]))
    total = PartialSum.zeros(tables.num_items, tables.dim)
    clip = float(message.content[P.COHORT].get(P.DELTA_CLIP, 0.0))
    outcomes = train_devices(devices, plan, tables, into=total, delta_clip=clip)
    content = RecordDict({P.REPORT: _report(outcomes, total.clipped), P.DEVICE: _devices_record(devices)})
    if total.count:
        content[P.DELTA] = ArrayRecord({k: Array(v) for k, v in P.delta_to_arrays(total.embedding,
                                                                                  total.bias).items()})
    return Message(content, reply_to=message)


def handle_popularity(message: Message, context: Context, config: RunConfig) -> Message:
    node = SimulatedNode(context, config)
    devices = node.devices(message.content)
    plan = PopularityPlan.from_config(dict(message.content[P.PRIOR]))
    outcomes, total = report_popularity_sum(devices, plan, node.population.num_items)
    content = RecordDict({P.REPORT: _report(outcomes), P.DEVICE: _devices_record(devices)})
    if total is not None:
        content[P.COUNTS] = ArrayRecord({P.ITEM_COUNTS: Array(total.astype(np.float32))})
    return Message(content, reply_to=message)


def handle_evaluate(message: Message, context: Context, config: RunConfig) -> Message:
    devices = SimulatedNode(context, config).devices(message.content)
    settings = message.content[P.EVAL]
    tables = P.tables_from_arrays(_arrays(message.content[P.TABLES]))
    per_device = [device.evaluate(tables, target=str(settings["target"]), l2=float(settings["refit-l2"]),
                                  sampled_seed=int(settings["sampled-seed"])) for device in devices]
    metrics = MetricRecord({key: [float(m[key]) for m in per_device] for key in per_device[0]})
    return Message(RecordDict({P.METRICS: metrics, P.DEVICE: _devices_record(devices)}), reply_to=message)


def handle_hello(message: Message, context: Context, config: RunConfig) -> Message:
    return Message(RecordDict({P.DEVICE: ConfigRecord({P.DEVICE_IDS: SimulatedNode(context, config).device_ids()})}),
                   reply_to=message)


Handler = Callable[[Message, Context, RunConfig], Message]


def _guarded(handler: Handler, config: RunConfig | None) -> Callable[[Message, Context], Message]:
    def run(message: Message, context: Context) -> Message:
        torch.set_num_threads(1)  # one simulated device per CPU; the simulation runs several in parallel
        try:
            run_config = config or RunConfig.from_mapping(context.run_config)
            return handler(message, context, run_config)
        except EXPECTED_ERRORS as err:
            log.error("device refused the %s request: %s", message.metadata.message_type, err)
            return Message(Error(code=DEVICE_ERROR_CODE, reason=f"{type(err).__name__}: {err}"), reply_to=message)

    return run


def build_client_app(config: RunConfig | None = None, *, mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp bound to `config`, or (None) reading the run config Flower passes in the Context."""
    client_app = ClientApp(mods=mods)
    client_app.train()(_guarded(handle_train, config))
    client_app.train("popularity")(_guarded(handle_popularity, config))
    client_app.evaluate()(_guarded(handle_evaluate, config))
    client_app.query()(_guarded(handle_hello, config))
    return client_app


app = build_client_app()

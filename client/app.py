"""Flower ClientApp: unpack a message, run the device's step from shared.device, pack the reply."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from shared import protocol as P
from shared.config import ConfigError, RunConfig
from shared.data.interactions import DataError
from shared.data.population import open_population
from shared.device import Device, DevicePolicy
from shared.popularity import PopularityPlan
from shared.state import DeviceState, FileStateStore, StateError
from shared.training import LocalTrainingPlan, PlanError

log = logging.getLogger("fedrec.client")

# Errors with a clear message for the server's log; anything else is a bug and propagates.
EXPECTED_ERRORS = (ConfigError, DataError, PlanError, P.ProtocolError, StateError)
DEVICE_ERROR_CODE = 100
STATE_RECORD = "fedrec-device-state"


class ContextStateStore:
    """Device state inside Flower's Context.state (lives as long as the simulation runs)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def load(self) -> DeviceState | None:
        record = self.context.state.get(STATE_RECORD)
        if record is None:
            return None
        return DeviceState.from_bytes(record["state"], source="Context.state")

    def save(self, state: DeviceState) -> None:
        self.context.state[STATE_RECORD] = ConfigRecord({"state": state.to_bytes()})


def open_device(context: Context, config: RunConfig) -> Device:
    """The simulated device behind this node: its partition of the population and its state store."""
    if "partition-id" not in context.node_config:
        raise ConfigError("node config: no 'partition-id'; simulated devices get it from Flower's simulation engine")
    index = int(context.node_config["partition-id"])
    population = open_population(config)
    if index >= population.num_devices:
        raise ConfigError(f"node partition-id {index}, but the population has {population.num_devices} devices: the "
                          "simulation must run exactly one node per device (num-supernodes = devices)")
    device_id = f"sim-{index}"
    events = population.device_events(index)
    store = (FileStateStore(Path(config.state_dir) / f"{device_id}.json") if config.state_dir
             else ContextStateStore(context))
    policy = DevicePolicy(epsilon_budget=config.epsilon_budget, embedding_dim=config.embedding_dim,
                          init_scale=config.init_scale, seed=config.seed)
    return Device(device_id, index, events, store, policy)


def _arrays(record: ArrayRecord) -> dict:
    return {key: array.numpy() for key, array in record.items()}


def _device_record(device: Device) -> ConfigRecord:
    return ConfigRecord({P.DEVICE_ID: device.device_id})


def handle_train(message: Message, context: Context, config: RunConfig) -> Message:
    device = open_device(context, config)
    plan = LocalTrainingPlan.from_config(dict(message.content[P.PLAN]))
    tables = P.tables_from_arrays(_arrays(message.content[P.TABLES]))
    outcome = device.train(plan, tables)
    content = RecordDict({P.REPORT: MetricRecord({"declined": int(outcome.declined), "epsilon": outcome.epsilon}),
                          P.DEVICE: _device_record(device)})
    if not outcome.declined:
        delta = P.delta_to_arrays(outcome.embedding_delta, outcome.bias_delta)
        content[P.DELTA] = ArrayRecord({k: Array(v) for k, v in delta.items()})
    return Message(content, reply_to=message)


def handle_popularity(message: Message, context: Context, config: RunConfig) -> Message:
    device = open_device(context, config)
    plan = PopularityPlan.from_config(dict(message.content[P.PRIOR]))
    num_items = open_population(config).num_items
    outcome, counts = device.report_popularity(plan, num_items)
    content = RecordDict({P.REPORT: MetricRecord({"declined": int(outcome.declined), "epsilon": outcome.epsilon}),
                          P.DEVICE: _device_record(device)})
    if counts is not None:
        content[P.COUNTS] = ArrayRecord({P.ITEM_COUNTS: Array(counts)})
    return Message(content, reply_to=message)


def handle_evaluate(message: Message, context: Context, config: RunConfig) -> Message:
    device = open_device(context, config)
    settings = message.content[P.EVAL]
    tables = P.tables_from_arrays(_arrays(message.content[P.TABLES]))
    metrics = device.evaluate(tables, target=str(settings["target"]), l2=float(settings["refit-l2"]),
                              sampled_seed=int(settings["sampled-seed"]))
    return Message(RecordDict({P.METRICS: MetricRecord(metrics), P.DEVICE: _device_record(device)}),
                   reply_to=message)


def handle_hello(message: Message, context: Context, config: RunConfig) -> Message:
    device = open_device(context, config)
    return Message(RecordDict({P.DEVICE: _device_record(device)}), reply_to=message)


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

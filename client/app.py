"""Flower ClientApp: unpack a message, run the step of the devices it names (shared.device), pack the reply.

Every handler is wrapped so that any exception leaves the device as an error code only: messages
(which may quote the device's data) go to the device's own log, never to the server.

In deployment Flower starts a fresh process for every message, so this module imports neither
torch nor Opacus: only a train message loads them (shared/device.train_devices), and the hello,
the popularity report and an evaluation release are answered without them
(tests/test_import_cost.py; `python -m fedrec.simulation.import_bench` measures the cost).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedrec.shared import protocol as P
from fedrec.shared.aggregation import PartialSum
from fedrec.shared.config import ConfigError, RunConfig
from fedrec.shared.data.interactions import DataError
from fedrec.shared.config import SECURE_MODES
from fedrec.shared.device import (Device, NonFiniteUpdate, TrainOutcome, report_popularity_sum, share_seed,
                                  train_devices)
from fedrec.shared.distributed_dp import GridSum, SumMechanism
from fedrec.shared.secagg import SecAggError
from fedrec.shared.secure_release import popularity_mechanism, training_mechanism
from fedrec.shared.eval_release import RELEASED_METRICS, EvaluationPlan
from fedrec.shared.plans import LocalTrainingPlan, PlanError
from fedrec.shared.policy import PolicyError
from fedrec.shared.popularity import PopularityPlan
from fedrec.shared.state import StateError

from .nodes import open_node
from .records import devices_record, received_head, report

log = logging.getLogger("fedrec.client")

DEVICE_ERROR_CODE = 100
# What the server learns of a failure: the kind of error, never its message.
ERROR_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (ConfigError, "node-config"), (PolicyError, "device-policy"), (PlanError, "bad-plan"),
    (P.ProtocolError, "bad-message"), (StateError, "device-state"), (DataError, "device-data"),
    (NonFiniteUpdate, "non-finite-update"), (SecAggError, "secure-aggregation"))


def _arrays(record: ArrayRecord) -> dict:
    return {key: array.numpy() for key, array in record.items()}


# Failures of the machine rather than of the request or the device's files: after a device committed, they are
# answered as declines (local mode) or with the noise share alone (secure modes), never as an error code.
RESOURCE_FAILURES: tuple[type[BaseException], ...] = (MemoryError, RuntimeError)


def error_code(err: BaseException) -> str:
    """The data-free name of an error: its kind only."""
    return next((code for kind, code in ERROR_CODES if isinstance(err, kind)), "internal-error")


def handle_train(message: Message, context: Context, config: RunConfig) -> Message:
    import torch  # the training path only (with Opacus, loaded by train_devices)

    torch.set_num_threads(1)  # one simulated device per CPU; the simulation runs several in parallel
    node = open_node(context, config)
    devices = node.devices(message.content)
    plan = LocalTrainingPlan.from_config(dict(message.content[P.PLAN]))
    tables = P.tables_from_arrays(_arrays(message.content[P.TABLES]))
    head = received_head(message.content, plan, tables.num_items)
    node.received(tables, plan.server_round)
    if plan.privacy in SECURE_MODES:
        _modelled_sums_only(node)
        return _modelled_sum(message, devices, plan, training_mechanism(
            plan, tables.num_items, tables.dim, *P.threshold(message.content[P.COHORT])),
            lambda grid: train_devices(devices, plan, tables, secure=grid, t_min=grid.mechanism.t_min,
                                       colluders=grid.mechanism.colluders, nonce=P.nonce(message.content[P.COHORT]),
                                       head=head))
    total = PartialSum.zeros(plan.trained_items(tables.num_items), tables.dim)
    clip = P.delta_clip(message.content[P.COHORT])
    try:
        outcomes = train_devices(devices, plan, tables, into=total, delta_clip=clip,
                                 nonce=P.nonce(message.content[P.COHORT]), head=head)
    except NonFiniteUpdate:
        raise  # its own error code: nothing was sent, the steps are charged
    except RESOURCE_FAILURES as err:
        # After the write-ahead charge, a failure of the machine (memory, an allocation refused) is answered like a
        # decline, with the figures as charged: whether it fails must not show anything the data shaped.
        log.warning("round %d: training failed after the round was charged (%s); answering as declined",
                    plan.server_round, type(err).__name__)
        outcomes = [d._outcome(d.load_state(), plan, declined=True) for d in devices]
        total = PartialSum.zeros(plan.trained_items(tables.num_items), tables.dim)
    content = RecordDict({P.REPORT: report(outcomes, total.clipped), P.DEVICE: devices_record(devices, outcomes)})
    if total.count:
        content[P.DELTA] = ArrayRecord({k: Array(v) for k, v in P.delta_to_arrays(total.embedding,
                                                                                  total.bias).items()})
    return Message(content, reply_to=message)


def handle_popularity(message: Message, context: Context, config: RunConfig) -> Message:
    node = open_node(context, config)
    devices = node.devices(message.content)
    plan = PopularityPlan.from_config(dict(message.content[P.PRIOR]))
    if plan.dp and plan.privacy in SECURE_MODES:
        _modelled_sums_only(node)
        return _modelled_sum(message, devices, plan, popularity_mechanism(
            plan, node.num_items, *P.threshold(message.content[P.COHORT])),
            lambda grid: report_popularity_sum(devices, plan, node.num_items, secure=grid, t_min=grid.mechanism.t_min,
                                               colluders=grid.mechanism.colluders,
                                               nonce=P.nonce(message.content[P.COHORT]))[0])
    outcomes, total = report_popularity_sum(devices, plan, node.num_items, nonce=P.nonce(message.content[P.COHORT]))
    content = RecordDict({P.REPORT: report(outcomes), P.DEVICE: devices_record(devices, outcomes)})
    if total is not None:
        content[P.COUNTS] = ArrayRecord({P.ITEM_COUNTS: Array(total.astype(np.float32))})
    return Message(content, reply_to=message)


def handle_evaluate(message: Message, context: Context, config: RunConfig) -> Message:
    node = open_node(context, config)
    devices = node.devices(message.content)
    plan = EvaluationPlan.from_config(dict(message.content[P.EVAL]))
    tables = P.tables_from_arrays(_arrays(message.content[P.TABLES]))
    node.received(tables, plan.server_round)
    nonce = P.nonce(message.content[P.COHORT])
    results = [device.evaluate(plan, tables, nonce=nonce) for device in devices]
    outcomes = [outcome for outcome, _ in results]
    released = [metrics for _, metrics in results if metrics is not None]
    # Metrics of the devices that released, in the order asked; nothing for those that refused or declined.
    content = RecordDict({P.REPORT: report(outcomes), P.DEVICE: devices_record(devices, outcomes)})
    if released:
        content[P.METRICS] = MetricRecord({k: [m[k] for m in released] for k in RELEASED_METRICS})
    return Message(content, reply_to=message)


def _modelled_sums_only(node: object) -> None:
    """A secure-mode plan outside the secure-sum protocol is answered only where sums are modelled (cohort engine):
    a deployed device would otherwise send its own vector, with only its noise share, in clear."""
    if not getattr(node, "models_secure_sums", False):
        raise P.ProtocolError("a distributed or user plan outside the secure-sum protocol: refused")


def _modelled_sum(message: Message, devices: list[Device], plan: LocalTrainingPlan | PopularityPlan,
                  mechanism: SumMechanism, run: Callable[[GridSum], list[TrainOutcome]]) -> Message:
    """Cohort engine, distributed and user modes: the node's devices' vectors on the grid, summed, plus one draw
    of all their noise shares (exactly the distribution of per-device draws). Secure aggregation is modelled,
    not enforced: a node speaks for many devices. Nothing per device leaves but its public figures."""
    grid = GridSum.zeros(mechanism)
    outcomes = run(grid)
    content = RecordDict({P.REPORT: report(outcomes), P.DEVICE: devices_record(devices, outcomes)})
    if grid.count:
        rng = np.random.default_rng(share_seed(devices, plan.server_round, P.nonce(message.content[P.COHORT])))
        content[P.GRID] = ArrayRecord({P.GRID_SUM: Array(grid.noised(rng))})
    return Message(content, reply_to=message)


def handle_hello(message: Message, context: Context, config: RunConfig) -> Message:
    return Message(RecordDict({P.DEVICE: ConfigRecord({P.DEVICE_IDS: open_node(context, config).device_ids()})}),
                   reply_to=message)


Handler = Callable[[Message, Context, RunConfig], Message]


def _guarded(handler: Handler, config: RunConfig | None) -> Callable[[Message, Context], Message]:
    def run(message: Message, context: Context) -> Message:
        gc.unfreeze()  # a process that answers more than one message collects what the last one left
        try:
            run_config = config or RunConfig.from_mapping(context.run_config)
            return handler(message, context, run_config)
        except Exception as err:  # noqa: BLE001 - the outermost layer: nothing but a code may leave
            code = error_code(err)
            log.error("device could not answer the %s request (%s): %s", message.metadata.message_type, code, err,
                      exc_info=code == "internal-error")
            return Message(Error(code=DEVICE_ERROR_CODE, reason=code), reply_to=message)
        finally:
            if "partition-id" not in context.node_config:
                # A deployed device's process exits after this reply (Flower 1.42): frozen objects are skipped by the
                # interpreter's collections at exit, 0.4-0.6 s once torch is loaded (import_bench's wall - reply).
                gc.freeze()

    return run


def build_client_app(config: RunConfig | None = None, *, mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp bound to `config`, or (None) reading the run config Flower passes in the Context."""
    client_app = ClientApp(mods=mods)
    client_app.train()(_guarded(handle_train, config))
    client_app.train("popularity")(_guarded(handle_popularity, config))
    client_app.evaluate()(_guarded(handle_evaluate, config))
    client_app.query()(_guarded(handle_hello, config))
    from . import secagg  # the stages of a real secure sum (distributed and user modes, one device per node)

    for stage, handler in secagg.HANDLERS.items():
        client_app.train(P.SECAGG_MESSAGE_TYPES[stage].split(".", 1)[1])(_guarded(handler, config))
    return client_app


app = build_client_app()

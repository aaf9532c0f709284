"""The device's side of a real secure sum (shared/secagg.py) on Flower messages: one handler per protocol stage.

keys:    the device sees the full plan and the sum's threshold t first; a plan outside its policy, or past
         its budget, is refused or declined here, before it commits (nothing is read, no keys are sent).
shares:  it Shamir-shares its secrets to every device that advertised keys.
masked:  it trains (or reports its indicator), adds its noise share on the grid (1/t of the sum's
         variance), charges its budget, masks the vector and sends only that; if its training fails after
         it committed, it sends its noise share on a zero vector, which reveals nothing of its data.
unmask:  it reveals, once, the shares the server needs to decrypt a sum of at least t devices.
Only data-independent figures travel beside the masked vector: its epsilons (from public plans and its
history) and its declined flag. The session's secrets live in the node's Context state between stages
(each stage may run in a fresh process).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedrec.shared import protocol as P
from fedrec.shared.config import SECURE_MODES, RunConfig
from fedrec.shared.device import Device, NonFiniteUpdate, TrainOutcome, report_popularity_sum, share_seed
from fedrec.shared.distributed_dp import GridSum, SumMechanism, to_modular
from fedrec.shared.plans import LocalTrainingPlan
from fedrec.shared.popularity import PopularityPlan
from fedrec.shared.secagg import ClientSession, SecAggError, SessionParams
from fedrec.shared.secure_release import popularity_mechanism, training_mechanism, update_dimension

from .nodes import open_node

SECAGG = "secagg"  # the protocol record of every stage's request
SESSION_STATE = "fedrec-secagg-session"  # the Context state record holding the session between stages
STAGES = ("keys", "shares", "masked", "unmask")
MESSAGE_TYPES = {stage: f"train.secagg_{stage}" for stage in STAGES}


def _plan(content: RecordDict) -> LocalTrainingPlan | PopularityPlan:
    plan: LocalTrainingPlan | PopularityPlan
    if P.PLAN in content:
        plan = LocalTrainingPlan.from_config(dict(content[P.PLAN]))
    elif P.PRIOR in content:
        plan = PopularityPlan.from_config(dict(content[P.PRIOR]))
    else:
        raise P.ProtocolError("secure sum request: no plan or prior record")
    # Only a distributed or user plan puts its noise into the sum as shares: any other plan would leave the
    # device with 1/t of the noise its accounting assumes.
    if plan.privacy not in SECURE_MODES or not plan.dp:
        raise P.ProtocolError(f"secure sum request: a {plan.privacy!r} plan (dp={plan.dp}) has no place in a "
                              "secure sum")
    return plan


def _plan_digest(content: RecordDict) -> str:
    record = dict(content[P.PLAN] if P.PLAN in content else content[P.PRIOR])
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _mechanism(plan: LocalTrainingPlan | PopularityPlan, num_items: int, dim: int, t_min: int) -> SumMechanism:
    if isinstance(plan, LocalTrainingPlan):
        return training_mechanism(plan, num_items, dim, t_min)
    return popularity_mechanism(plan, num_items, t_min)


def _one_device(devices: list[Device]) -> Device:
    if len(devices) != 1:
        raise P.ProtocolError(f"a secure sum runs with one device per node, this request names {len(devices)}")
    return devices[0]


def _stage_record(content: RecordDict, stage: str) -> dict[str, Any]:
    if SECAGG not in content:
        raise P.ProtocolError("secure sum request: no protocol record")
    record = dict(content[SECAGG])
    if record.get("stage") != stage:
        raise P.ProtocolError(f"secure sum request: stage {record.get('stage')!r}, expected {stage!r}")
    return record


def _save(context: Context, session: ClientSession, **extra: Any) -> None:
    context.state[SESSION_STATE] = ConfigRecord({"session": session.to_bytes(), **extra})


def _load(context: Context) -> tuple[ClientSession, dict[str, Any]]:
    if SESSION_STATE not in context.state:
        raise SecAggError("no secure-sum session on this device (a stage arrived out of order)")
    record = dict(context.state[SESSION_STATE])
    return ClientSession.from_bytes(record.pop("session")), record


def _open_stage(message: Message, context: Context, config: RunConfig, stage: str,
                ) -> tuple[Any, list[Device], Device, dict[str, Any], ClientSession, dict[str, Any]]:
    """The node, its one device, the stage's protocol record and the session saved by the previous stage."""
    node = open_node(context, config)
    devices = node.devices(message.content)
    device = _one_device(devices)
    record = _stage_record(message.content, stage)
    session, saved = _load(context)
    return node, devices, device, record, session, saved


def _parallel_lists(record: dict[str, Any], *keys: str) -> list[list[Any]]:
    """Lists of equal length under `keys` of a protocol record (ids beside their keys, ciphertexts, shares)."""
    values = [record.get(key) for key in keys]
    if not all(isinstance(v, list) for v in values) or len({len(v) for v in values}) != 1:
        raise P.ProtocolError(f"secure sum: {', '.join(keys)} should be lists of equal length")
    return values


def _reply(message: Message, devices: list[Device], outcomes: list[TrainOutcome], **records: Any) -> Message:
    from .app import _devices_record, _report  # the same public figures as every other reply

    return Message(RecordDict({P.REPORT: _report(outcomes), P.DEVICE: _devices_record(devices, outcomes),
                               **records}), reply_to=message)


def handle_keys(message: Message, context: Context, config: RunConfig) -> Message:
    node = open_node(context, config)
    devices = node.devices(message.content)
    device = _one_device(devices)
    plan = _plan(message.content)
    try:
        params = SessionParams.from_dict(json.loads(str(_stage_record(message.content, "keys")["params"])))
    except (KeyError, TypeError, ValueError) as err:
        raise P.ProtocolError(f"secure sum: unreadable session parameters ({type(err).__name__})") from None
    dim = config.embedding_dim
    expected = update_dimension(plan, node.num_items, dim) if isinstance(plan, LocalTrainingPlan) else node.num_items
    if params.vector_length != expected:
        raise P.ProtocolError(f"secure sum: vector length {params.vector_length}, expected {expected}")
    _mechanism(plan, node.num_items, dim, params.threshold)  # a mechanism it cannot draw exactly: refused here
    state = device.load_state()
    verdict = device.admit(plan, state, params.threshold)  # the plan and t, before anything is committed
    if verdict is not None:
        context.state.pop(SESSION_STATE, None)
        return _reply(message, devices, [verdict])
    session, keys = ClientSession.start(params, device.device_id,
                                        min_threshold=max(2, device.policy.min_aggregation_threshold))
    _save(context, session, plan=_plan_digest(message.content), threshold=params.threshold)
    outcome = device._outcome(state, plan, declined=False)
    return _reply(message, devices, [outcome], **{SECAGG: ConfigRecord({"c": keys["c"], "s": keys["s"]})})


def handle_shares(message: Message, context: Context, config: RunConfig) -> Message:
    _, devices, device, record, session, saved = _open_stage(message, context, config, "shares")
    ids, c_keys, s_keys = _parallel_lists(record, "ids", "c", "s")
    ciphertexts = session.share_keys({str(i): {"c": bytes(c), "s": bytes(s)} for i, c, s in zip(ids, c_keys, s_keys)})
    _save(context, session, **saved)
    to = sorted(ciphertexts)
    return _reply(message, devices, [device._outcome(device.load_state(), _plan(message.content), declined=False)],
                  **{SECAGG: ConfigRecord({"to": to, "ct": [ciphertexts[v] for v in to]})})


def handle_masked(message: Message, context: Context, config: RunConfig) -> Message:
    node, devices, device, record, session, saved = _open_stage(message, context, config, "masked")
    if saved.get("plan") != _plan_digest(message.content):
        raise SecAggError("the plan changed after this device committed to the round")
    plan = _plan(message.content)
    t_min = int(saved["threshold"])
    senders, cts = _parallel_lists(record, "from", "ct")
    nonce = P.nonce(message.content[P.COHORT])
    # Verify the routed shares and fix U2 first, and store that before reading any data: a replayed or forged
    # masked request then fails here, so one commitment never trains (or charges the budget) twice.
    session.receive_shares({str(v): bytes(c) for v, c in zip(senders, cts)})
    _save(context, session, **saved)
    if isinstance(plan, LocalTrainingPlan):
        import torch  # the training path only

        torch.set_num_threads(1)
        tables = P.tables_from_arrays({k: a.numpy() for k, a in message.content[P.TABLES].items()})
        node.received(tables, plan.server_round)
        mechanism = _mechanism(plan, node.num_items, tables.dim, t_min)
        if mechanism.dimension != session.params.vector_length:
            raise P.ProtocolError("secure sum: the tables do not match the vector length committed to")
        grid = GridSum.zeros(mechanism)
        try:
            outcomes = train_devices_secure(devices, plan, tables, grid, t_min, nonce)
        except NonFiniteUpdate:  # charged already; the noise share alone goes into the sum
            grid = GridSum.zeros(mechanism)
            grid.add(None)
            outcomes = [device._outcome(device.load_state(), plan, declined=False)]
    else:
        mechanism = _mechanism(plan, node.num_items, 0, t_min)
        grid = GridSum.zeros(mechanism)
        outcomes, _ = report_popularity_sum(devices, plan, node.num_items, secure=grid, t_min=t_min, nonce=nonce)
    if grid.count == 0:  # it declined after committing (a release in between took its budget): noise share only
        grid.add(None)
    rng = np.random.default_rng(share_seed(devices, plan.server_round, nonce))
    masked = session.mask_input(to_modular(grid.noised(rng)))
    _save(context, session, **saved)
    return _reply(message, devices, outcomes, **{P.GRID: ArrayRecord({P.GRID_SUM: Array(masked)})})


def handle_unmask(message: Message, context: Context, config: RunConfig) -> Message:
    _, devices, device, record, session, saved = _open_stage(message, context, config, "unmask")
    alive, dead = record.get("alive"), record.get("dead")
    if not (isinstance(alive, list) and isinstance(dead, list)):
        raise P.ProtocolError("secure sum: alive and dead should be lists of device ids")
    shares = session.unmask([str(a) for a in alive], [str(d) for d in dead])
    _save(context, session, **saved)  # answered: the stored session now refuses a second request
    ids = sorted(shares)
    return _reply(message, devices, [device._outcome(device.load_state(), _plan(message.content), declined=False)],
                  **{SECAGG: ConfigRecord({"ids": ids, "share": [shares[i] for i in ids]})})


def train_devices_secure(devices: list[Device], plan: LocalTrainingPlan, tables: Any, grid: GridSum, t_min: int,
                         nonce: int) -> list[TrainOutcome]:
    from fedrec.shared.device import train_devices

    return train_devices(devices, plan, tables, secure=grid, t_min=t_min, nonce=nonce)


HANDLERS = {"keys": handle_keys, "shares": handle_shares, "masked": handle_masked, "unmask": handle_unmask}

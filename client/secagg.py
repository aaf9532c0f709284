"""The device's side of a real secure sum (shared/secagg.py) on Flower messages: one handler per protocol stage.

keys:        the device sees the full plan, t and c first; a plan outside its policy (t, c, its enrolment),
             or past its budget, is refused or declined here, before it commits (nothing is read, no keys sent).
             It advertises fresh keys signed with its enrolled key over (session, round, t, c, length, plan).
shares:      it verifies every member's certificate (against the authority it pinned) and signature, checks
             |U1| < 2t - c, and only then Shamir-shares its secrets to U1.
masked:      it trains (or reports its indicator), adds its noise share on the grid (1/(t - c) of the sum's
             variance), charges its budget, masks the vector and sends only that; if its training fails after
             it committed, it sends its noise share on a zero vector, which reveals nothing of its data.
consistency: it signs the survivor view it is told (alive, dead) with its U1, once.
unmask:      it reveals, once, the shares the server needs, only after t members of its U1 signed that view.
Only data-independent figures travel beside the masked vector: its epsilons (from public plans and its
history), the t and c it accounted with, and its declined flag. The session's secrets live in the node's
Context state between stages (each stage may run in a fresh process).
"""

from __future__ import annotations

import json
import logging
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

from .nodes import Node, SessionStore, open_node
from .records import devices_record, received_head, report

log = logging.getLogger("fedrec.client")

OWN_SHARE_WARNING = 10.0  # warn the device's owner when the own-share figure passes this many budgets


def _plan(content: RecordDict) -> LocalTrainingPlan | PopularityPlan:
    plan: LocalTrainingPlan | PopularityPlan
    if P.PLAN in content:
        plan = LocalTrainingPlan.from_config(dict(content[P.PLAN]))
    elif P.PRIOR in content:
        plan = PopularityPlan.from_config(dict(content[P.PRIOR]))
    else:
        raise P.ProtocolError("secure sum request: no plan or prior record")
    # Only a distributed or user plan puts its noise into the sum as shares: any other plan would leave the
    # device with 1/(t - c) of the noise its accounting assumes.
    if plan.privacy not in SECURE_MODES or not plan.dp:
        raise P.ProtocolError(f"secure sum request: a {plan.privacy!r} plan (dp={plan.dp}) has no place in a "
                              "secure sum")
    return plan


def plan_digest(content: RecordDict) -> bytes:
    """SHA-256 of the plan record as received: every member signs it into its advertisement."""
    return P.plan_digest(content[P.PLAN] if P.PLAN in content else content[P.PRIOR])


def _mechanism(plan: LocalTrainingPlan | PopularityPlan, num_items: int, dim: int, t_min: int,
               colluders: int) -> SumMechanism:
    if isinstance(plan, LocalTrainingPlan):
        return training_mechanism(plan, num_items, dim, t_min, colluders)
    return popularity_mechanism(plan, num_items, t_min, colluders)


def _one_device(devices: list[Device]) -> Device:
    if len(devices) != 1:
        raise P.ProtocolError(f"a secure sum runs with one device per node, this request names {len(devices)}")
    return devices[0]


def _stage_record(content: RecordDict, stage: str) -> dict[str, Any]:
    if P.SECAGG not in content:
        raise P.ProtocolError("secure sum request: no protocol record")
    record = dict(content[P.SECAGG])
    if record.get("stage") != stage:
        raise P.ProtocolError(f"secure sum request: stage {record.get('stage')!r}, expected {stage!r}")
    return record


def _load(store: SessionStore) -> tuple[ClientSession, dict[str, Any]]:
    loaded = store.load()
    if loaded is None:
        raise SecAggError("no secure-sum session on this device (a stage arrived out of order)")
    return loaded


def _open_stage(message: Message, context: Context, config: RunConfig, stage: str,
                ) -> tuple[Node, list[Device], Device, dict[str, Any], SessionStore]:
    """The node, its one device, the stage's protocol record and the store of its session. Every stage then
    loads, advances and saves the session in one step under the store's lock, before it answers: two requests
    racing on one device (Flower may run them as parallel processes) never both pass a stage."""
    node = open_node(context, config)
    devices = node.devices(message.content)
    device = _one_device(devices)
    record = _stage_record(message.content, stage)
    return node, devices, device, record, node.session_store(context)


def _session(message: Message, store: SessionStore) -> tuple[ClientSession, dict[str, Any]]:
    """The stored session (call under the store's lock); the plan must be the one it committed to."""
    session, saved = _load(store)
    if saved.get("plan") != plan_digest(message.content).hex():
        raise SecAggError("the plan changed after this device committed to the round")
    return session, saved


def _parallel_lists(record: dict[str, Any], *keys: str) -> list[list[Any]]:
    """Lists of equal length under `keys` of a protocol record (ids beside their keys, ciphertexts, shares)."""
    values = [record.get(key) for key in keys]
    if not all(isinstance(v, list) for v in values) or len({len(v) for v in values}) != 1:
        raise P.ProtocolError(f"secure sum: {', '.join(keys)} should be lists of equal length")
    return values


def _reply(message: Message, devices: list[Device], outcomes: list[TrainOutcome], **records: Any) -> Message:
    return Message(RecordDict({P.REPORT: report(outcomes), P.DEVICE: devices_record(devices, outcomes),
                               **records}), reply_to=message)


def _standing(device: Device, plan: LocalTrainingPlan | PopularityPlan) -> list[TrainOutcome]:
    """The device's public figures as they stand (between stages nothing is charged)."""
    return [device._outcome(device.load_state(), plan, declined=False)]


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
    if isinstance(plan, LocalTrainingPlan) and plan.head_size > node.num_items:  # refused before it commits
        raise P.ProtocolError(f"round plan: head-size {plan.head_size} exceeds the catalogue's {node.num_items} items")
    expected = update_dimension(plan, node.num_items, dim) if isinstance(plan, LocalTrainingPlan) else node.num_items
    if params.vector_length != expected:
        raise P.ProtocolError(f"secure sum: vector length {params.vector_length}, expected {expected}")
    if params.plan_digest != plan_digest(message.content) or params.server_round != plan.server_round:
        raise P.ProtocolError("secure sum: the session parameters name another plan or round")
    t, c = params.threshold, params.colluders
    # A mechanism it cannot draw exactly is refused here (PlanError), before anything is committed.
    _mechanism(plan, node.num_items, dim, t, c)
    enrolment = node.enrolment(device.device_id)
    shape = (plan.trained_items(node.num_items), dim) if isinstance(plan, LocalTrainingPlan) else (0, 0)  # memory cap
    verdict = device.screen(plan, t, c, rule="" if enrolment is not None else "enrolment", shape=shape)
    store = node.session_store(context)
    with store.locked():
        if verdict is not None:
            store.clear()
            return _reply(message, devices, [verdict])
        session, advert = ClientSession.start(params, enrolment[0])  # type: ignore[index]
        store.save(session, plan=params.plan_digest.hex(), threshold=t, colluders=c)
    return _reply(message, devices, _standing(device, plan), **{P.SECAGG: ConfigRecord(advert)})


def handle_shares(message: Message, context: Context, config: RunConfig) -> Message:
    node, devices, device, record, store = _open_stage(message, context, config, "shares")
    enrolment = node.enrolment(device.device_id)
    if enrolment is None:
        raise SecAggError("this device has no enrolled identity and pinned authority")
    ids, c_keys, s_keys, certs, sigs = _parallel_lists(record, "ids", "c", "s", "cert", "sig")
    adverts = {str(i): {"c": bytes(c), "s": bytes(s), "cert": bytes(cert), "sig": bytes(sig)}
               for i, c, s, cert, sig in zip(ids, c_keys, s_keys, certs, sigs, strict=True)}
    if len(adverts) != len(ids):
        raise SecAggError("a member id appears twice in the key list")
    with store.locked():
        session, saved = _session(message, store)
        ciphertexts = session.share_keys(adverts, enrolment[1])
        store.save(session, **saved)
    to = sorted(ciphertexts)
    return _reply(message, devices, _standing(device, _plan(message.content)),
                  **{P.SECAGG: ConfigRecord({"to": to, "ct": [ciphertexts[v] for v in to]})})


def handle_masked(message: Message, context: Context, config: RunConfig) -> Message:
    node, devices, device, record, store = _open_stage(message, context, config, "masked")
    plan = _plan(message.content)
    senders, cts = _parallel_lists(record, "from", "ct")
    nonce = P.nonce(message.content[P.COHORT])
    # Verify the routed shares and fix U2 first, and store that before reading any data: a replayed, forged or
    # concurrent masked request then fails here, so one commitment never trains (or charges the budget) twice.
    with store.locked():
        session, saved = _session(message, store)
        session.receive_shares({str(v): bytes(c) for v, c in zip(senders, cts)})
        store.save(session, **saved)
    t_min, colluders = int(saved["threshold"]), int(saved["colluders"])
    if isinstance(plan, LocalTrainingPlan):
        import torch  # the training path only

        torch.set_num_threads(1)
        tables = P.tables_from_arrays({k: a.numpy() for k, a in message.content[P.TABLES].items()})
        head = received_head(message.content, plan, tables.num_items)
        node.received(tables, plan.server_round)
        mechanism = _mechanism(plan, node.num_items, tables.dim, t_min, colluders)
        if mechanism.dimension != session.params.vector_length:
            raise P.ProtocolError("secure sum: the tables do not match the vector length committed to")
        grid = GridSum.zeros(mechanism)
        try:
            from fedrec.shared.device import train_devices

            outcomes = train_devices(devices, plan, tables, secure=grid, t_min=t_min, colluders=colluders,
                                     nonce=nonce, head=head)
        except (NonFiniteUpdate, MemoryError, RuntimeError) as err:
            # Charged already (write-ahead): the noise share alone goes into the sum, which reveals nothing of the
            # data; the failure itself is never an error reply whose presence the data could have shaped.
            log.warning("round %d: training failed after the round was charged (%s); sending the noise share only",
                        plan.server_round, type(err).__name__)
            grid = GridSum.zeros(mechanism)
            grid.add(None)
            outcomes = [device.outcome(plan, (t_min, colluders))]
    else:
        mechanism = _mechanism(plan, node.num_items, 0, t_min, colluders)
        grid = GridSum.zeros(mechanism)
        outcomes, _ = report_popularity_sum(devices, plan, node.num_items, secure=grid, t_min=t_min,
                                            colluders=colluders, nonce=nonce)
    if grid.count == 0:  # it declined after committing (a release in between took its budget): noise share only
        grid.add(None)
    _warn_own_share(device, outcomes[0])
    rng = np.random.default_rng(share_seed(devices, plan.server_round, nonce))
    with store.locked():  # masks once: the session stored as received by this very request
        session, saved = _session(message, store)
        masked = session.mask_input(to_modular(grid.noised(rng)))
        store.save(session, **saved)
    return _reply(message, devices, outcomes, **{P.GRID: ArrayRecord({P.GRID_SUM: Array(masked)})})


def handle_consistency(message: Message, context: Context, config: RunConfig) -> Message:
    node, devices, device, record, store = _open_stage(message, context, config, "consistency")
    alive, dead = record.get("alive"), record.get("dead")
    if not (isinstance(alive, list) and isinstance(dead, list)):
        raise P.ProtocolError("secure sum: alive and dead should be lists of device ids")
    enrolment = node.enrolment(device.device_id)
    if enrolment is None:
        raise SecAggError("this device has no enrolled identity and pinned authority")
    with store.locked():  # signed and stored in one step: the session signs no other view
        session, saved = _session(message, store)
        signature = session.consistency([str(a) for a in alive], [str(d) for d in dead], enrolment[0])
        store.save(session, **saved)
    return _reply(message, devices, _standing(device, _plan(message.content)),
                  **{P.SECAGG: ConfigRecord({"sig": signature})})


def handle_unmask(message: Message, context: Context, config: RunConfig) -> Message:
    _, devices, device, record, store = _open_stage(message, context, config, "unmask")
    signers, signatures = _parallel_lists(record, "signers", "sig")
    with store.locked():  # answered and stored in one step: a second request finds the session done
        session, saved = _session(message, store)
        shares = session.unmask({str(s): bytes(sig) for s, sig in zip(signers, signatures)})
        store.save(session, **saved)
    ids = sorted(shares)
    return _reply(message, devices, _standing(device, _plan(message.content)),
                  **{P.SECAGG: ConfigRecord({"ids": ids, "share": [shares[i] for i in ids]})})


def _warn_own_share(device: Device, outcome: TrainOutcome) -> None:
    """The own-share figure holds only if enrolment is honest too; tell the device's owner, in its own log, when it
    has grown past OWN_SHARE_WARNING budgets (`fedrec device status` shows it as well)."""
    budget = device.policy.epsilon_budget
    if outcome.epsilon_subverted > OWN_SHARE_WARNING * budget:
        log.warning("device %s: its epsilon against a server that also controls enrolment (own noise share only) "
                    "is %.3g, past %g x its budget %g; set max-subverted-epsilon in its policy to cap it",
                    device.device_id, outcome.epsilon_subverted, OWN_SHARE_WARNING, budget)


HANDLERS = {"keys": handle_keys, "shares": handle_shares, "masked": handle_masked,
            "consistency": handle_consistency, "unmask": handle_unmask}

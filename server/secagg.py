"""The server's side of a real secure sum (shared/secagg.py) on Flower messages: five stages, one device per node.

keys -> shares -> masked -> consistency -> unmask. Devices see the plan, t and c in the first stage and
commit (or refuse, or decline) there; the server aborts before anyone trains when fewer than t devices are
left after the key or share stage, so a sum that cannot be decrypted charges nobody. Devices train only in
the masked stage; if fewer than t masked vectors (or consistency signatures) arrive, the round is aborted
(those devices were charged, and the ledger says so). The server never sees one device's vector in clear:
what it decrypts is the sum of at least t devices' quantised, noised updates, and the devices check that
themselves (signed advertisements, the consistency round) rather than trusting this code.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedrec.shared import protocol as P
from fedrec.shared.config import RunConfig
from fedrec.shared.distributed_dp import SumMechanism
from fedrec.shared.secagg import SecAggError, ServerSession, SessionParams

SECAGG, MESSAGE_TYPES = P.SECAGG, P.SECAGG_MESSAGE_TYPES

from .exchange import send_and_receive
from .replies import Asked, TrainReplies, sort_secure_stage

log = logging.getLogger("fedrec.server")


def run_secure_sum(grid: Grid, config: RunConfig, server_round: int, kind: str, content: dict[str, Any],
                   asked: Asked, mechanism: SumMechanism, *, nonce: int, message_type: str,
                   epsilon_budget: float) -> tuple[TrainReplies, np.ndarray | None, int]:
    """One secure sum over the devices `asked` (one per node): (replies, the decoded sum or None, shares in it)."""
    del message_type  # every stage has its own message type
    for node, devices in asked.items():
        if len(devices) != 1:
            raise ValueError(f"node {node} hosts {len(devices)} devices: a real secure sum needs one per node "
                             "(the cohort engine models it instead)")
    device_of = {node: devices[0] for node, devices in asked.items()}
    node_of = {device: node for node, device in device_of.items()}
    plan_record = content[P.PLAN] if P.PLAN in content else content[P.PRIOR]
    digest = P.plan_digest(plan_record)
    params = SessionParams(session_id=os.urandom(16), threshold=mechanism.t_min, vector_length=mechanism.dimension,
                           colluders=mechanism.colluders, server_round=server_round, plan_digest=digest)
    session = ServerSession(params)
    plan_records = {k: v for k, v in content.items() if k not in (P.TABLES, P.HEAD)}  # those: masked stage only
    out = TrainReplies()

    def send(stage: str, nodes: Iterable[int], extra: dict[int, dict[str, Any]] | None = None,
             with_tables: bool = False) -> dict[str, Message]:
        messages = []
        for node in sorted(nodes):
            records: dict[str, Any] = {**plan_records, P.COHORT: ConfigRecord({P.DEVICE_IDS: [device_of[node]],
                                                                               P.NONCE: nonce})}
            if with_tables:
                records.update({k: content[k] for k in (P.TABLES, P.HEAD) if k in content})
            records[SECAGG] = ConfigRecord({"stage": stage, **((extra or {}).get(node, {}))})
            messages.append(Message(RecordDict(records), dst_node_id=node, message_type=MESSAGE_TYPES[stage],
                                    ttl=config.round_timeout))
        replies = send_and_receive(grid, messages, timeout=config.round_timeout)
        return sort_secure_stage(replies, {n: asked[n] for n in nodes}, out, stage=stage, dp=config.dp,
                                 epsilon_budget=epsilon_budget)

    def abort(stage: str, err: Exception) -> tuple[TrainReplies, None, int]:
        log.warning("round %d (%s): secure sum aborted at the %s stage: %s", server_round, kind, stage, err)
        return out, None, len(out.trained)

    # 1. keys: the plan, t and c; refusals and declines stay out (data-free: from the plan and public histories)
    key_params = {"params": _flat(params.to_dict())}
    keys = send("keys", device_of, {n: key_params for n in device_of})
    advertised = {d: {f: bytes(r[SECAGG][f]) for f in ("c", "s", "cert", "sig")} for d, r in _joined(keys).items()
                  if all(f in r[SECAGG] for f in ("c", "s", "cert", "sig"))}
    try:
        broadcast, excluded = session.receive_keys(advertised)
    except SecAggError as err:
        return abort("keys", err)
    for device, why in excluded.items():
        out.rejected[device] = why
        log.warning("round %d (%s): left %s out of the secure sum: %s", server_round, kind, device, why)
    ids = sorted(broadcast)
    key_list = {"ids": ids, **{f: [broadcast[i][f] for i in ids] for f in ("c", "s", "cert", "sig")}}
    # 2. shares: each device checks every advertisement itself before it shares anything
    sent = send("shares", [node_of[d] for d in ids], {node_of[d]: key_list for d in ids})
    try:
        routed = session.route_shares({d: dict(zip(r[SECAGG]["to"], (bytes(c) for c in r[SECAGG]["ct"])))
                                       for d, r in _joined(sent).items()})
    except (SecAggError, KeyError, TypeError) as err:
        return abort("shares", err)
    # 3. masked: devices train (or report) now, and are charged
    routes = {node_of[d]: {"from": sorted(cts), "ct": [cts[v] for v in sorted(cts)]} for d, cts in routed.items()}
    masked_replies = send("masked", routes, routes, with_tables=True)
    masked = {}
    for device, reply in _joined(masked_replies).items():
        vector = P.grid_from_arrays({k: a.numpy() for k, a in reply[P.GRID].items()}, mechanism.dimension,
                                    np.uint64)
        masked[device] = vector
        if device not in out.declined:
            out.trained.append(device)
    out.trained.sort()
    try:
        alive, dead = session.receive_masked(masked)
    except SecAggError as err:
        return abort("masked", err)
    # 4. consistency: every survivor signs the view it is told
    view = {"alive": alive, "dead": dead}
    signed = send("consistency", [node_of[d] for d in alive], {node_of[d]: view for d in alive})
    try:
        signatures = session.receive_signatures({d: bytes(r[SECAGG]["sig"]) for d, r in _joined(signed).items()})
    except (SecAggError, KeyError, TypeError) as err:
        return abort("consistency", err)
    # 5. unmask: each signer checks t signatures of its own U1 over the same view, then reveals
    relay = {"signers": sorted(signatures), "sig": [signatures[d] for d in sorted(signatures)]}
    shares = send("unmask", [node_of[d] for d in signatures], {node_of[d]: relay for d in signatures})
    try:
        total = session.unmask({d: dict(zip(r[SECAGG]["ids"], (bytes(s) for s in r[SECAGG]["share"])))
                                for d, r in _joined(shares).items()})
    except (SecAggError, KeyError, TypeError) as err:
        return abort("unmask", err)
    return out, mechanism.decode(total), len(alive)


def _joined(replies: dict[str, Message]) -> dict[str, RecordDict]:
    """Device -> reply content, for devices whose reply passed validation and carries a protocol payload."""
    return {device: reply.content for device, reply in replies.items()
            if SECAGG in reply.content or P.GRID in reply.content}


def _flat(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


"""Sorting and validating device replies: a bad reply is rejected with a reason, never a crash."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message

from shared import protocol as P
from shared.evaluation import DEVICE_METRIC_KEYS
from shared.model import ItemTables


log = logging.getLogger("fedrec.server")
EPSILON_SLACK = 1e-9  # relative tolerance when comparing a reported epsilon to the budget


@dataclass
class TrainReplies:
    updates: dict[str, Any] = field(default_factory=dict)  # device -> validated payload (delta or counts)
    epsilon: dict[str, float] = field(default_factory=dict)  # reported cumulative epsilon, trained or declined
    declined: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # device -> reason
    failed: dict[str, str] = field(default_factory=dict)  # device -> error / no reply


@dataclass
class EvalReplies:
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def _sender(reply: Message, device_of: dict[int, str]) -> str:
    return device_of.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")


def _check_identity(reply: Message, expected: str) -> None:
    try:
        claimed = str(reply.content[P.DEVICE][P.DEVICE_ID])
    except (KeyError, TypeError):
        raise P.ProtocolError("reply has no device record") from None
    if claimed != expected:
        raise P.ProtocolError(f"reply claims to come from '{claimed}', but the node belongs to '{expected}'")


def _finite_number(record: dict, key: str) -> float:
    if key not in record:
        raise P.ProtocolError(f"report: missing '{key}'")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise P.ProtocolError(f"report: '{key}'={value!r} is not a finite number")
    return float(value)


def sort_train_replies(replies: Iterable[Message], asked: dict[int, str], tables: ItemTables, *,
                       dp: bool, epsilon_budget: float) -> TrainReplies:
    """Training replies: a validated item delta per device that trained."""
    return _sort_reports(replies, asked, P.DELTA, lambda arrays: P.delta_from_arrays(arrays, tables),
                         dp=dp, epsilon_budget=epsilon_budget)


def sort_popularity_replies(replies: Iterable[Message], asked: dict[int, str], num_items: int, *,
                            dp: bool, epsilon_budget: float) -> TrainReplies:
    """Popularity replies: a validated noisy item-count vector per device that reported."""
    return _sort_reports(replies, asked, P.COUNTS, lambda arrays: P.counts_from_arrays(arrays, num_items),
                         dp=dp, epsilon_budget=epsilon_budget)


def _sort_reports(replies: Iterable[Message], asked: dict[int, str], record: str,
                  parse: Callable[[dict[str, np.ndarray]], Any], *, dp: bool, epsilon_budget: float) -> TrainReplies:
    out = TrainReplies()
    answered = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in asked:
            log.warning("ignoring a reply from node %d, which was not asked this round", node)
            continue
        device = asked[node]
        answered.add(node)
        if reply.has_error():
            out.failed[device] = reply.error.reason or f"error code {reply.error.code}"
            log.warning("device %s failed: %s", device, out.failed[device])
            continue
        try:
            _check_identity(reply, device)
            if P.REPORT not in reply.content:
                raise P.ProtocolError("reply has no report record")
            report = dict(reply.content[P.REPORT])
            declined = _finite_number(report, "declined")
            eps = _finite_number(report, "epsilon")
            if declined not in (0.0, 1.0) or eps < 0:
                raise P.ProtocolError(f"report: declined={declined}, epsilon={eps} out of range")
            if dp and eps > epsilon_budget * (1 + EPSILON_SLACK):
                raise P.ProtocolError(f"reported epsilon {eps:.4f} exceeds the budget {epsilon_budget}")
            out.epsilon[device] = eps
            if declined:
                out.declined.append(device)
                continue
            if record not in reply.content:
                raise P.ProtocolError(f"reply neither declines nor carries a '{record}' record")
            arrays = {k: np.asarray(a.numpy()) for k, a in reply.content[record].items()}
            out.updates[device] = parse(arrays)
        except (P.ProtocolError, ValueError, TypeError) as err:
            out.rejected[device] = str(err)
            out.epsilon.pop(device, None)
            log.warning("rejected the reply of device %s: %s", device, err)
    for node in set(asked) - answered:
        out.failed[asked[node]] = "no reply before the round timeout"
    return out


def sort_eval_replies(replies: Iterable[Message], asked: dict[int, str]) -> EvalReplies:
    out = EvalReplies()
    answered = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in asked:
            continue
        device = asked[node]
        answered.add(node)
        if reply.has_error():
            out.failed[device] = reply.error.reason or f"error code {reply.error.code}"
            continue
        try:
            _check_identity(reply, device)
            metrics = dict(reply.content[P.METRICS])
            values = {k: _finite_number(metrics, k) for k in DEVICE_METRIC_KEYS}
            if any(not 0.0 <= v <= 1.0 for v in values.values()):
                raise P.ProtocolError(f"metrics out of [0, 1]: {values}")
            values.update({k: float(v) for k, v in metrics.items() if k.startswith("sampled_")})
            out.metrics[device] = values
        except (P.ProtocolError, KeyError, TypeError, ValueError) as err:
            out.rejected[device] = str(err)
            log.warning("rejected the evaluation of device %s: %s", device, err)
    for node in set(asked) - answered:
        out.failed[asked[node]] = "no reply before the round timeout"
    return out

"""Sorting and validating node replies: a bad reply is rejected with a reason, never a crash.

A node answers for the devices it was asked about (one in deployment, a shard in a cohort
simulation): per-device reports in the order asked, plus one sum of the updates of those
that trained. Anything wrong in a reply rejects all of that node's devices for the round,
since their contributions cannot be told apart inside the sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedrec.shared import protocol as P
from fedrec.shared.aggregation import PartialSum, delta_norm
from fedrec.shared.eval_release import RELEASED_METRICS
from fedrec.shared.model import ItemTables
from fedrec.shared.policy import RULES

log = logging.getLogger("fedrec.server")
EPSILON_SLACK = 1e-9  # relative tolerance when comparing a reported epsilon to the budget
NORM_SLACK = 1e-4  # relative tolerance of the clip check (a clipped float32 update can round a hair above it)

Asked = dict[int, list[str]]  # node -> the devices it was asked about, in order


@dataclass
class TrainReplies:
    parts: dict[int, Any] = field(default_factory=dict)  # node -> validated payload (PartialSum or counts sum)
    trained: list[str] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)  # reported cumulative epsilon, trained or declined
    epsilon_subverted: dict[str, float] = field(default_factory=dict)  # own share: enrolment subverted too
    epsilon_honest: dict[str, float] = field(default_factory=dict)  # against a server that follows the protocol
    secure_seen: dict[str, tuple[int, int]] = field(default_factory=dict)  # device -> (t, c) it accounted with
    declined: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # device -> the policy rule the plan broke
    rejected: dict[str, str] = field(default_factory=dict)  # device -> reason
    failed: dict[str, str] = field(default_factory=dict)  # device -> error / no reply

    def ordered_parts(self, asked: Asked) -> list[Any]:
        """Payloads in the order of each node's first device: sums are added in a reproducible order."""
        return [self.parts[node] for node in sorted(self.parts, key=lambda n: asked[n][0])]


def _check_identity(reply: Message, expected: list[str]) -> None:
    if P.DEVICE not in reply.content:
        raise P.ProtocolError("reply has no device record")
    claimed = P.device_ids(reply.content[P.DEVICE], "device record")
    if claimed != expected:
        raise P.ProtocolError(f"reply speaks for devices {claimed}, but the node was asked about {expected}")


def _secure_seen(report: dict[str, Any], count: int) -> list[tuple[int, int] | None]:
    """The (t, c) each device says it accounted its secure-sum release with (None: no release into a sum)."""
    if P.THRESHOLD not in report:
        return [None] * count
    ts = _per_device(report, P.THRESHOLD, count, "report")
    cs = _per_device(report, P.COLLUDERS, count, "report")
    out: list[tuple[int, int] | None] = []
    for t, c in zip(ts, cs):
        if t != int(t) or c != int(c) or t < 0 or not 0 <= c <= max(t - 1, 0):
            raise P.ProtocolError(f"report: secure sum t={t}, c={c} out of range")
        out.append((int(t), int(c)) if t else None)
    return out


def _finite(value: Any, what: str, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(float(value)) or \
            (math.isinf(float(value)) and not allow_inf):
        raise P.ProtocolError(f"{what}={value!r} is not a finite number")
    return float(value)


def _per_device(record: dict, key: str, count: int, what: str, *, allow_inf: bool = False) -> list[float]:
    values = record.get(key)
    if not isinstance(values, list) or len(values) != count:
        raise P.ProtocolError(f"{what}: '{key}' should list {count} value(s), one per device, got {values!r}")
    return [_finite(v, f"{what}: '{key}'", allow_inf=allow_inf) for v in values]


def _refusals(reply: Message, count: int) -> list[str]:
    """The policy rule each device's refusal names ('' for none); only known rule names are accepted."""
    rules = reply.content[P.DEVICE].get(P.REFUSED, [""] * count)
    if not isinstance(rules, list) or len(rules) != count or any(r and r not in RULES for r in rules):
        raise P.ProtocolError(f"device record: '{P.REFUSED}' should list {count} rule name(s) from {list(RULES)}")
    return [str(r) for r in rules]


def _replies_by_node(replies: Iterable[Message], asked: Asked, out: TrainReplies,
                     ) -> Iterable[tuple[int, list[str], Message]]:
    """Replies of asked nodes (errors become failures); nodes that never answered are failed at the end."""
    answered = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in asked:
            log.warning("ignoring a reply from node %d, which was not asked this round", node)
            continue
        answered.add(node)
        if reply.has_error():
            reason = reply.error.reason or f"error code {reply.error.code}"
            out.failed.update({d: reason for d in asked[node]})
            log.warning("node %d (%s) failed: %s", node, _names(asked[node]), reason)
            continue
        yield node, asked[node], reply
    for node in set(asked) - answered:
        out.failed.update({d: "no reply before the round timeout" for d in asked[node]})


def _names(devices: list[str]) -> str:
    return devices[0] if len(devices) == 1 else f"{len(devices)} devices from {devices[0]}"


def sort_train_replies(replies: Iterable[Message], asked: Asked, tables: ItemTables, *, dp: bool,
                       epsilon_budget: float, delta_clip: float) -> TrainReplies:
    """Training replies: per node, the validated sum of its trained devices' (clipped) item deltas."""
    def parse(arrays: dict[str, np.ndarray], count: int, report: dict) -> PartialSum:
        emb, bias = P.delta_from_arrays(arrays, tables)
        norm = delta_norm((emb, bias))
        if delta_clip > 0 and norm > count * delta_clip * (1 + NORM_SLACK):
            raise P.ProtocolError(f"update norm {norm:.4g} exceeds the bound {count} x delta-clip-norm {delta_clip}")
        clipped = int(_finite(report.get("clipped", 0), "report: 'clipped'"))
        return PartialSum(emb.astype(np.float64), bias.astype(np.float64), count=count, clipped=clipped)

    return _sort_reports(replies, asked, P.DELTA, parse, dp=dp, epsilon_budget=epsilon_budget)


def sort_grid_replies(replies: Iterable[Message], asked: Asked, dimension: int, *, dp: bool,
                      epsilon_budget: float) -> TrainReplies:
    """Modelled secure sums (cohort engine): per node, its devices' summed grid vector (int64, noised with all
    their shares) and how many shares it holds. Nothing per device is checked beyond its public figures:
    the server of a secure sum cannot see one device's update (its validation is on the device)."""
    return _sort_reports(replies, asked, P.GRID,
                         lambda arrays, count, _: (P.grid_from_arrays(arrays, dimension), count),
                         dp=dp, epsilon_budget=epsilon_budget)


def sort_secure_stage(replies: Iterable[Message], asked: Asked, out: TrainReplies, *, stage: str, dp: bool,
                      epsilon_budget: float) -> dict[str, Message]:
    """One stage of a real secure sum (one device per node): device -> its reply, for devices still in the protocol.

    Every reply carries the device's public figures (declined flag, refusal rule, epsilons); a device that
    refuses or declines (first stage only), fails, or sends a malformed reply leaves the protocol and is
    recorded in `out`. The protocol payload itself is checked by the secure-aggregation session.
    """
    kept: dict[str, Message] = {}
    for node, devices, reply in _replies_by_node(replies, asked, out):
        device = devices[0]
        try:
            _check_identity(reply, devices)
            if P.REPORT not in reply.content:
                raise P.ProtocolError("reply has no report record")
            report = dict(reply.content[P.REPORT])
            declined = _per_device(report, "declined", 1, "report")[0]
            eps = _per_device(report, "epsilon", 1, "report", allow_inf=not dp)[0]
            eps_subverted = _per_device(report, "epsilon-subverted", 1, "report", allow_inf=True)[0]
            eps_honest = _per_device(report, "epsilon-honest", 1, "report", allow_inf=True)[0]
            seen = _secure_seen(report, 1)[0]
            rule = _refusals(reply, 1)[0]
            if declined not in (0.0, 1.0) or eps < 0 or (rule and not declined) or \
                    (declined and stage not in ("keys", "masked")):
                raise P.ProtocolError(f"report: declined={declined}, epsilon={eps} out of range at stage {stage}")
            if dp and eps > epsilon_budget * (1 + EPSILON_SLACK):
                raise P.ProtocolError(f"reported epsilon {eps:.4f} exceeds the budget {epsilon_budget}")
            payload = P.GRID if stage == "masked" else "secagg"
            # a device that declines at the masked stage still sends its (data-independent) noise share
            if (not declined or stage == "masked") and payload not in reply.content:
                raise P.ProtocolError(f"the {stage} reply carries no '{payload}' record")
        except (P.ProtocolError, ValueError, TypeError) as err:
            out.rejected[device] = str(err)
            log.warning("rejected the %s reply of node %d (%s): %s", stage, node, device, err)
            continue
        out.epsilon[device], out.epsilon_subverted[device] = eps, eps_subverted
        out.epsilon_honest[device] = eps_honest
        if seen is not None:
            out.secure_seen[device] = seen
        if rule:
            out.refused[device] = rule
        elif declined:
            out.declined.append(device)
            if stage == "masked":
                kept[device] = reply  # its noise share stays in the sum (and keeps the masks cancelling)
        else:
            kept[device] = reply
    out.declined.sort()
    return kept


def sort_popularity_replies(replies: Iterable[Message], asked: Asked, num_items: int, *, dp: bool,
                            epsilon_budget: float) -> TrainReplies:
    """Popularity replies: per node, the validated sum of its devices' noisy item-count vectors."""
    return _sort_reports(replies, asked, P.COUNTS,
                         lambda arrays, count, _: (P.counts_from_arrays(arrays, num_items).astype(np.float64), count),
                         dp=dp, epsilon_budget=epsilon_budget)


def _sort_reports(replies: Iterable[Message], asked: Asked, record: str,
                  parse: Callable[[dict[str, np.ndarray], int, dict], Any], *, dp: bool,
                  epsilon_budget: float) -> TrainReplies:
    out = TrainReplies()
    for node, devices, reply in _replies_by_node(replies, asked, out):
        try:
            _check_identity(reply, devices)
            if P.REPORT not in reply.content:
                raise P.ProtocolError("reply has no report record")
            report = dict(reply.content[P.REPORT])
            declined = _per_device(report, "declined", len(devices), "report")
            eps = _per_device(report, "epsilon", len(devices), "report", allow_inf=not dp)
            eps_subverted = _per_device(report, "epsilon-subverted", len(devices), "report", allow_inf=True) \
                if "epsilon-subverted" in report else eps
            eps_honest = _per_device(report, "epsilon-honest", len(devices), "report", allow_inf=True) \
                if "epsilon-honest" in report else eps
            seen = _secure_seen(report, len(devices))
            rules = _refusals(reply, len(devices))
            if any(d not in (0.0, 1.0) for d in declined) or min(eps) < 0 or \
                    any(rule and not flag for rule, flag in zip(rules, declined)):
                raise P.ProtocolError(f"report: declined={declined}, epsilon={eps} out of range")
            if dp and max(eps) > epsilon_budget * (1 + EPSILON_SLACK):
                raise P.ProtocolError(f"reported epsilon {max(eps):.4f} exceeds the budget {epsilon_budget}")
            trained = [d for d, flag in zip(devices, declined) if not flag]
            if trained and record not in reply.content:
                raise P.ProtocolError(f"{len(trained)} device(s) trained but the reply carries no '{record}' record")
            if not trained and record in reply.content:
                raise P.ProtocolError(f"every device declined but the reply carries a '{record}' record")
            if trained:
                payload = reply.content[record]
                values = ({k: np.asarray(a.numpy()) for k, a in payload.items()} if isinstance(payload, ArrayRecord)
                          else dict(payload))
                out.parts[node] = parse(values, len(trained), report)
        except (P.ProtocolError, ValueError, TypeError) as err:
            out.rejected.update({d: str(err) for d in devices})
            log.warning("rejected the reply of node %d (%s): %s", node, _names(devices), err)
            continue
        out.trained += trained
        out.refused.update({d: rule for d, rule in zip(devices, rules) if rule})
        out.declined += [d for d, rule in zip(devices, rules) if d not in trained and not rule]
        out.epsilon.update(zip(devices, eps))
        out.epsilon_subverted.update(zip(devices, eps_subverted))
        out.epsilon_honest.update(zip(devices, eps_honest))
        out.secure_seen.update({d: tc for d, tc in zip(devices, seen) if tc is not None})
    out.trained.sort()
    out.declined.sort()
    return out


def sort_eval_replies(replies: Iterable[Message], asked: Asked, *, dp: bool, epsilon_budget: float) -> TrainReplies:
    """Evaluation releases: per node, {device: noised metrics} of the devices that released (values may leave
    [0, 1]: the noise is what makes them private, so only finiteness is checked)."""
    def parse(record: dict, count: int, report: dict) -> list[dict[str, float]]:
        values = {k: _per_device(record, k, count, "metrics") for k in RELEASED_METRICS}
        return [{k: values[k][j] for k in RELEASED_METRICS} for j in range(count)]

    return _sort_reports(replies, asked, P.METRICS, parse, dp=dp, epsilon_budget=epsilon_budget)

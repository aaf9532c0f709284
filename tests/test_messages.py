"""What crosses the wire: real ClientApp replies, and the server's validation of bad replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.app import build_client_app
from server.replies import sort_eval_replies, sort_train_replies
from shared import protocol as P
from shared.state import FileStateStore
from tests.helpers import message, plan, tables


def arrays_record(arrays):
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def train_request(t, node, **plan_changes):
    content = RecordDict({P.TABLES: arrays_record(P.tables_to_arrays(t)),
                          P.PLAN: ConfigRecord(plan(**plan_changes).to_config())})
    return message(content, dst=node, message_type="train")


def context(partition: int, config) -> Context:
    return Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition, "num-partitions": 12},
                   state=RecordDict(), run_config={})


def all_floats(reply: Message) -> np.ndarray:
    values = [a.numpy().ravel() for rec in reply.content.array_records.values() for a in rec.values()]
    values += [np.asarray([v], float) for rec in reply.content.metric_records.values() for v in rec.values()]
    return np.concatenate(values) if values else np.zeros(0)


def test_train_reply_carries_only_the_item_delta_and_epsilon(small_config):
    client = build_client_app(small_config)
    t = tables(num_items=small_config.synthetic_items, dim=small_config.embedding_dim)
    for server_round in (1, 2):
        reply = client(train_request(t, 103, server_round=server_round, num_negatives=4), context(3, small_config))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert set(reply.content.keys()) == {P.DELTA, P.REPORT, P.DEVICE}
        assert set(reply.content[P.DELTA].keys()) == {P.EMBEDDING_DELTA, P.BIAS_DELTA}
        assert set(reply.content[P.REPORT].keys()) == {"declined", "epsilon"}
        assert dict(reply.content[P.DEVICE]) == {P.DEVICE_ID: "sim-3"}
        user_row = FileStateStore(f"{small_config.state_dir}/sim-3.json").load().user_row
        floats = all_floats(reply)
        # no coordinate of the private user row appears anywhere in what the device sent
        assert not np.isin(user_row.astype(np.float32), floats.astype(np.float32)).any()
        assert reply.content[P.DELTA][P.EMBEDDING_DELTA].numpy().shape == t.embedding.shape


def test_evaluate_reply_carries_only_metrics(small_config):
    client = build_client_app(small_config)
    t = tables(num_items=small_config.synthetic_items, dim=small_config.embedding_dim)
    content = RecordDict({P.TABLES: arrays_record(P.tables_to_arrays(t)),
                          P.EVAL: ConfigRecord({"server-round": 1, "target": "test", "refit-l2": 1.0,
                                                "sampled-seed": 0})})
    reply = client(message(content, dst=105, message_type="evaluate"), context(5, small_config))
    assert set(reply.content.keys()) == {P.METRICS, P.DEVICE}
    assert not reply.content.array_records


def test_device_refuses_a_malformed_plan_with_a_clear_error(small_config):
    client = build_client_app(small_config)
    request = train_request(tables(num_items=small_config.synthetic_items, dim=small_config.embedding_dim), 103)
    del request.content[P.PLAN]["noise-multiplier"]
    reply = client(request, context(3, small_config))
    assert reply.has_error() and "missing key 'noise-multiplier'" in reply.error.reason


def good_reply(request, t, *, device="dev-1", declined=False, eps=1.0, emb=None, bias=None):
    content = RecordDict({P.REPORT: MetricRecord({"declined": int(declined), "epsilon": eps}),
                          P.DEVICE: ConfigRecord({P.DEVICE_ID: device})})
    if not declined:
        emb = np.zeros_like(t.embedding) if emb is None else emb
        bias = np.zeros_like(t.bias) if bias is None else bias
        content[P.DELTA] = arrays_record({P.EMBEDDING_DELTA: emb, P.BIAS_DELTA: bias})
    return Message(content, reply_to=request)


BAD_REPLIES = {
    "wrong shape": dict(emb=np.zeros((19, 4), np.float32)),
    "NaN": dict(emb=np.full((20, 4), np.nan, np.float32)),
    "Inf": dict(bias=np.full(20, np.inf, np.float32)),
    "float64": dict(bias=np.zeros(20, np.float64)),
    "over budget": dict(eps=9.0),
    "negative epsilon": dict(eps=-1.0),
    "claims another identity": dict(device="dev-1"),  # node 12 belongs to dev-2
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_bad_train_replies_are_rejected_and_the_rest_kept(case):
    t = tables()
    ok_request, bad_request = (message(RecordDict(), dst=node, message_type="train") for node in (11, 12))
    replies = [good_reply(ok_request, t, device="dev-1"), good_reply(bad_request, t, **{"device": "dev-2",
                                                                                       **BAD_REPLIES[case]})]
    sorted_replies = sort_train_replies(replies, {11: "dev-1", 12: "dev-2"}, t, dp=True, epsilon_budget=8.0)
    assert list(sorted_replies.updates) == ["dev-1"]
    assert list(sorted_replies.rejected) == ["dev-2"]


def test_declined_missing_and_unasked_replies():
    t = tables()
    requests = {node: message(RecordDict(), dst=node, message_type="train") for node in (11, 12, 13, 99)}
    replies = [good_reply(requests[11], t, device="dev-1", declined=True, eps=7.5),
               good_reply(requests[99], t, device="intruder")]
    out = sort_train_replies(replies, {11: "dev-1", 12: "dev-2"}, t, dp=True, epsilon_budget=8.0)
    assert out.declined == ["dev-1"] and out.epsilon == {"dev-1": 7.5}
    assert out.failed == {"dev-2": "no reply before the round timeout"}
    assert not out.updates and not out.rejected


def test_bad_evaluation_replies_are_rejected():
    request = message(RecordDict(), dst=11, message_type="evaluate")
    bad = Message(RecordDict({P.METRICS: MetricRecord({"hr@10": 3.0, "ndcg@10": 0.1, "recall@20": 0.1}),
                              P.DEVICE: ConfigRecord({P.DEVICE_ID: "dev-1"})}), reply_to=request)
    out = sort_eval_replies([bad], {11: "dev-1"})
    assert not out.metrics and "out of [0, 1]" in out.rejected["dev-1"]

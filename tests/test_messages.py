"""What crosses the wire: real ClientApp replies, and the server's validation of bad replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedrec.client.app import build_client_app
from fedrec.server.replies import sort_eval_replies, sort_train_replies
from fedrec.shared import protocol as P
from fedrec.shared.state import SlotStateStore
from tests.helpers import message, plan, tables


def arrays_record(arrays):
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def cohort(*devices, clip=0.0, nonce=0):
    return ConfigRecord({P.DEVICE_IDS: list(devices), P.DELTA_CLIP: clip, P.NONCE: nonce})


def train_request(t, node, devices=("sim-3",), clip=0.0, nonce=0, **plan_changes):
    content = RecordDict({P.TABLES: arrays_record(P.tables_to_arrays(t)),
                          P.PLAN: ConfigRecord(plan(**plan_changes).to_config()),
                          P.COHORT: cohort(*devices, clip=clip, nonce=nonce)})
    return message(content, dst=node, message_type="train")


def context(partition: int, config, partitions: int = 12) -> Context:
    return Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition,
                                                                    "num-partitions": partitions},
                   state=RecordDict(), run_config={})


def all_floats(reply: Message) -> np.ndarray:
    values = [a.numpy().ravel() for rec in reply.content.array_records.values() for a in rec.values()]
    values += [np.asarray(v, float).ravel() for rec in reply.content.metric_records.values() for v in rec.values()]
    return np.concatenate(values) if values else np.zeros(0)


def test_train_reply_carries_only_the_item_delta_and_epsilon(small_config):
    client = build_client_app(small_config)
    t = tables(num_items=small_config.synthetic_items, dim=small_config.embedding_dim)
    for server_round in (1, 2):
        reply = client(train_request(t, 103, server_round=server_round, num_negatives=4, noise_multiplier=3.0),
                       context(3, small_config))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert set(reply.content.keys()) == {P.DELTA, P.REPORT, P.DEVICE}
        assert set(reply.content[P.DELTA].keys()) == {P.EMBEDDING_DELTA, P.BIAS_DELTA}
        assert set(reply.content[P.REPORT].keys()) == {"declined", "epsilon", "epsilon-subverted", "epsilon-honest",
                                                       "clipped"}
        assert dict(reply.content[P.DEVICE]) == {P.DEVICE_IDS: ["sim-3"], P.REFUSED: [""]}
        user_row = SlotStateStore(small_config.state_dir, "sim-3").load().user_row
        floats = all_floats(reply)
        # no coordinate of the private user row appears anywhere in what the device sent
        assert not np.isin(user_row.astype(np.float32), floats.astype(np.float32)).any()
        assert reply.content[P.DELTA][P.EMBEDDING_DELTA].numpy().shape == t.embedding.shape


def eval_request(t, node, device, **changes):
    settings = {"server-round": 1, "dp": True, "noise-multiplier": 5.0, "delta": 1e-5, "refit-l2": 1.0, **changes}
    content = RecordDict({P.TABLES: arrays_record(P.tables_to_arrays(t)), P.EVAL: ConfigRecord(settings),
                          P.COHORT: cohort(device)})
    return message(content, dst=node, message_type="evaluate")


def test_evaluate_reply_carries_only_noised_metrics_and_is_charged(small_config):
    client = build_client_app(small_config)
    t = tables(num_items=small_config.synthetic_items, dim=small_config.embedding_dim)
    reply = client(eval_request(t, 105, "sim-5"), context(5, small_config))
    assert set(reply.content.keys()) == {P.METRICS, P.REPORT, P.DEVICE}
    assert not reply.content.array_records
    assert set(reply.content[P.METRICS].keys()) == {"hr@10", "ndcg@10", "recall@20"}
    assert all(len(v) == 1 for v in reply.content[P.METRICS].values())
    assert SlotStateStore(small_config.state_dir, "sim-5").load().history == ((5.0, 1.0, 1),)
    assert reply.content[P.REPORT]["epsilon"][0] > 0


def test_each_attempt_of_a_round_draws_fresh_noise(small_config, tmp_path):
    """A simulated device is seeded (reproducible), but a round run again (next attempt nonce) gets new noise."""
    t = tables(num_items=small_config.synthetic_items, dim=small_config.embedding_dim)

    def update(nonce: int, folder: str) -> np.ndarray:
        config = small_config.replace(state_dir=str(tmp_path / folder))
        reply = build_client_app(config)(train_request(t, 103, nonce=nonce, num_negatives=4), context(3, config))
        return reply.content[P.DELTA][P.EMBEDDING_DELTA].numpy()

    np.testing.assert_array_equal(update(0, "a"), update(0, "b"))
    assert not np.allclose(update(0, "c"), update(1, "d"))


def test_a_shard_node_trains_its_devices_and_sends_one_clipped_sum(small_config):
    """Cohort engine: node 1 of 3 hosts sim-1, sim-4, sim-7, sim-10; it answers for the two it is asked about."""
    from fedrec.shared.aggregation import delta_norm

    client = build_client_app(small_config)
    t = tables(num_items=small_config.synthetic_items, dim=small_config.embedding_dim)
    hello = client(message(RecordDict(), dst=101, message_type="query"), context(1, small_config, partitions=3))
    assert hello.content[P.DEVICE][P.DEVICE_IDS] == ["sim-1", "sim-4", "sim-7", "sim-10"]
    reply = client(train_request(t, 101, devices=("sim-10", "sim-4"), clip=0.05, num_negatives=4),
                   context(1, small_config, partitions=3))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content[P.DEVICE][P.DEVICE_IDS] == ["sim-10", "sim-4"]
    report = reply.content[P.REPORT]
    assert report["declined"] == [0, 0] and len(report["epsilon"]) == 2 and report["clipped"] == 2
    summed = tuple(reply.content[P.DELTA][k].numpy() for k in (P.EMBEDDING_DELTA, P.BIAS_DELTA))
    assert delta_norm(summed) <= 2 * 0.05 * (1 + 1e-5)
    stranger = client(train_request(t, 101, devices=("sim-2",)), context(1, small_config, partitions=3))
    assert stranger.has_error() and stranger.error.reason == "bad-message"


def test_device_refuses_a_malformed_plan_with_a_code_and_logs_the_reason(small_config, caplog):
    client = build_client_app(small_config)
    request = train_request(tables(num_items=small_config.synthetic_items, dim=small_config.embedding_dim), 103)
    del request.content[P.PLAN]["noise-multiplier"]
    reply = client(request, context(3, small_config))
    assert reply.has_error() and reply.error.reason == "bad-plan"
    assert "missing key 'noise-multiplier'" in caplog.text  # the detail stays in the device's own log


def good_reply(request, t, *, devices=("dev-1",), declined=None, eps=None, emb=None, bias=None, clipped=0):
    declined = declined or [0] * len(devices)
    eps = eps or [1.0] * len(devices)
    content = RecordDict({P.REPORT: MetricRecord({"declined": declined, "epsilon": eps, "clipped": clipped}),
                          P.DEVICE: ConfigRecord({P.DEVICE_IDS: list(devices)})})
    if not all(declined):
        emb = np.zeros_like(t.embedding) if emb is None else emb
        bias = np.zeros_like(t.bias) if bias is None else bias
        content[P.DELTA] = arrays_record({P.EMBEDDING_DELTA: emb, P.BIAS_DELTA: bias})
    return Message(content, reply_to=request)


BAD_REPLIES = {
    "wrong shape": dict(emb=np.zeros((19, 4), np.float32)),
    "NaN": dict(emb=np.full((20, 4), np.nan, np.float32)),
    "Inf": dict(bias=np.full(20, np.inf, np.float32)),
    "float64": dict(bias=np.zeros(20, np.float64)),
    "norm far above the clip": dict(emb=np.full((20, 4), 1.0, np.float32)),
    "over budget": dict(eps=[9.0]),
    "negative epsilon": dict(eps=[-1.0]),
    "one epsilon for two devices": dict(devices=("dev-2", "dev-3"), eps=[1.0]),
    "claims another identity": dict(devices=("dev-1",)),  # node 12 was asked about dev-2
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_bad_train_replies_are_rejected_and_the_rest_kept(case):
    t = tables()
    ok_request, bad_request = (message(RecordDict(), dst=node, message_type="train") for node in (11, 12))
    bad = {"devices": ("dev-2",), **BAD_REPLIES[case]}
    replies = [good_reply(ok_request, t, devices=("dev-1",)), good_reply(bad_request, t, **bad)]
    asked = {11: ["dev-1"], 12: list(bad["devices"]) if case == "one epsilon for two devices" else ["dev-2"]}
    sorted_replies = sort_train_replies(replies, asked, t, dp=True, epsilon_budget=8.0, delta_clip=1.0)
    assert sorted_replies.trained == ["dev-1"] and list(sorted_replies.parts) == [11]
    assert sorted(sorted_replies.rejected) == asked[12]


def test_declined_missing_and_unasked_replies():
    t = tables()
    requests = {node: message(RecordDict(), dst=node, message_type="train") for node in (11, 12, 13, 99)}
    replies = [good_reply(requests[11], t, devices=("dev-1",), declined=[1], eps=[7.5]),
               good_reply(requests[99], t, devices=("intruder",))]
    out = sort_train_replies(replies, {11: ["dev-1"], 12: ["dev-2"]}, t, dp=True, epsilon_budget=8.0, delta_clip=0.0)
    assert out.declined == ["dev-1"] and out.epsilon == {"dev-1": 7.5}
    assert out.failed == {"dev-2": "no reply before the round timeout"}
    assert not out.parts and not out.rejected


def test_a_shard_reply_counts_its_trained_devices_and_orders_sums_by_device():
    t = tables()
    requests = {node: message(RecordDict(), dst=node, message_type="train") for node in (11, 12)}
    ones = np.full_like(t.embedding, 0.01)
    replies = [good_reply(requests[12], t, devices=("a", "c", "e"), declined=[0, 1, 0], eps=[1.0, 7.9, 1.0], emb=ones),
               good_reply(requests[11], t, devices=("b",), emb=2 * ones)]
    asked = {12: ["a", "c", "e"], 11: ["b"]}
    out = sort_train_replies(replies, asked, t, dp=True, epsilon_budget=8.0, delta_clip=1.0)
    assert out.trained == ["a", "b", "e"] and out.declined == ["c"]
    parts = out.ordered_parts(asked)
    assert [p.count for p in parts] == [2, 1]  # node 12 holds 'a', the first device
    assert np.allclose(parts[0].embedding, 0.01) and np.allclose(parts[1].embedding, 0.02)


def test_bad_evaluation_replies_are_rejected():
    request = message(RecordDict(), dst=11, message_type="evaluate")
    report = MetricRecord({"declined": [0], "epsilon": [1.0], "clipped": 0})
    bad = Message(RecordDict({P.METRICS: MetricRecord({"hr@10": [float("nan")], "ndcg@10": [0.1],
                                                       "recall@20": [0.1]}),
                              P.REPORT: report, P.DEVICE: ConfigRecord({P.DEVICE_IDS: ["dev-1"]})}), reply_to=request)
    out = sort_eval_replies([bad], {11: ["dev-1"]}, dp=True, epsilon_budget=8.0)
    assert not out.parts and "not a finite number" in out.rejected["dev-1"]


def test_the_default_influence_bound_passes_honest_updates_and_rejects_far_larger_ones():
    """delta-clip-norm 'auto': real DP updates fit under the bound; one 10x above it is rejected."""
    from fedrec.server.core import update_bound
    from fedrec.shared.aggregation import delta_norm
    from fedrec.shared.config import RunConfig
    from fedrec.shared.training import DeviceTrainingData, train_cohort

    t = tables(num_items=200, dim=8)
    p = plan(noise_multiplier=2.0, lr=0.5, steps=1, train_biases=False)
    bound = update_bound(RunConfig(), p, 200, 8)
    assert bound > 0 and update_bound(RunConfig(dp=False), plan(dp=False, noise_multiplier=0.0), 200, 8) == 0.0
    items = np.arange(60) % 200
    data = [DeviceTrainingData(items=items, weights=np.ones(60, np.float32), seed=(3, k)) for k in range(5)]
    update = train_cohort(p, t, np.zeros((5, 8), np.float32), data, [[]] * 5, noise_seed=1)
    norms = [delta_norm((update.embedding_delta[k], update.bias_delta[k])) for k in range(5)]
    assert max(norms) < bound
    request = message(RecordDict(), dst=11, message_type="train")
    poisoned = np.full_like(t.embedding, 10 * bound / np.sqrt(t.embedding.size))
    out = sort_train_replies([good_reply(request, t, devices=("dev-1",), emb=poisoned)], {11: ["dev-1"]}, t, dp=True,
                             epsilon_budget=8.0, delta_clip=bound)
    assert "exceeds the bound" in out.rejected["dev-1"]

"""The trained head: chosen from the noisy prior alone, checked by devices, trained and applied on its rows only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fedrec.server.audit import audit_run
from fedrec.server.core import ItemModelServer, round_plan, trained_head
from fedrec.server.records import Checkpoint, RunRecords
from fedrec.shared import protocol as P
from fedrec.shared.config import RunConfig
from fedrec.shared.data.interactions import DeviceEvents
from fedrec.shared.device import Device, DeviceSettings, train_devices
from fedrec.shared.head import MIN_HEAD, NoisyPrior, check_head, fill_tail, head_digest, select_head
from fedrec.shared.model import ItemTables
from fedrec.shared.plans import PlanError
from fedrec.shared.policy import PrivacyPolicy
from fedrec.shared.state import MemoryStateStore
from fedrec.simulation.plain import run_plain
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import plan, tables


def prior(counts, std=1.0) -> NoisyPrior:
    return NoisyPrior(np.asarray(counts, dtype=np.float64), noise_std=std, reports=10)


def test_auto_head_is_the_items_above_z_noise_stds_and_at_least_the_minimum():
    counts = np.zeros(40)
    counts[[3, 7, 11]] = [9.0, 3.0, 2.9]  # z = 3 at std 1: items 3 and 7 pass, 11 does not
    head = select_head(prior(counts), 40, size=None, z=3.0)
    assert len(head) == MIN_HEAD and {3, 7} <= set(head.tolist())
    counts[:30] += 10.0  # 30 items clear the bar
    assert len(select_head(prior(counts), 40, size=None, z=3.0)) == 30
    tied = select_head(prior(np.full(40, 10.0), std=100.0), 40, size=None, z=3.0)
    assert tied.tolist() == list(range(MIN_HEAD))  # nobody clears the bar: the minimum, ties to the lower ids


def test_top_n_head_all_items_and_no_prior():
    counts = np.arange(20, dtype=float)[::-1]  # item 0 the most popular
    assert select_head(prior(counts), 20, size=5, z=3.0).tolist() == [0, 1, 2, 3, 4]
    assert select_head(prior(counts), 20, size=0, z=3.0) is None  # 0: every item trains
    assert select_head(prior(counts), 20, size=20, z=3.0) is None
    assert select_head(None, 20, size=5, z=3.0) is None  # popularity-prior = false: nothing to choose from
    no_noise = prior(np.r_[np.ones(15), np.zeros(5)], std=0.0)  # without DP: the items anyone holds
    assert select_head(no_noise, 20, size=None, z=3.0).tolist() == list(range(15))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=12, max_size=60), st.floats(0.1, 10), st.floats(0.5, 5))
def test_head_is_a_function_of_the_noisy_counts_alone(counts, std, z):
    head = select_head(prior(counts, std), len(counts), size=None, z=z)
    again = select_head(prior(list(counts), std), len(counts), size=None, z=z)
    assert (head is None and again is None) or np.array_equal(head, again)
    if head is not None:
        chosen = np.asarray(counts)[head]
        rest = np.delete(np.asarray(counts), head)
        assert chosen.min() >= rest.max()  # the head is a top set of the noisy counts
        assert np.all(np.diff(head) > 0)


def test_a_device_checks_the_head_against_its_plan():
    head = np.array([1, 4, 9], dtype=np.int64)
    digest = head_digest(head)
    assert check_head(head, size=3, digest=digest, num_items=10) is head
    for bad, why in ((np.array([1, 9, 4]), "increasing"), (np.array([1, 4, 10]), "increasing"),
                     (np.array([1, 4]), "plan names"), (np.array([1, 4, 8]), "digest")):
        with pytest.raises(ValueError, match=why):
            check_head(bad.astype(np.int64), size=3, digest=digest, num_items=10)
    with pytest.raises(P.ProtocolError, match="head-size is 0"):
        P.head_from_arrays(P.head_to_arrays(head), size=0, digest="", num_items=10)
    with pytest.raises(P.ProtocolError, match="none were sent"):
        P.head_from_arrays(None, size=3, digest=digest, num_items=10)
    with pytest.raises(PlanError, match="head_sha256"):
        plan(head_size=3, head_sha256="")
    with pytest.raises(PlanError, match="head_sha256"):
        plan(head_size=0, head_sha256=digest)


def _device(items, key=3) -> Device:
    events = DeviceEvents(items=np.asarray(items, dtype=np.int64), times=np.arange(len(items), dtype=np.int64),
                          weights=np.ones(len(items), np.float32))
    return Device(f"dev-{key}", key, lambda: events, MemoryStateStore(), DeviceSettings(4, 0.1, 0),
                  PrivacyPolicy(epsilon_budget=1e9, allow_no_dp=True))


def test_only_the_head_rows_train_and_items_outside_it_are_not_read():
    full = tables(num_items=20)
    head = np.array([2, 5, 7, 11], dtype=np.int64)
    no_dp = dict(dp=False, noise_multiplier=0.0, user_noise_multiplier=0.0, train_biases=True)
    p = plan(**no_dp, head_size=4, head_sha256=head_digest(head))
    inside = train_devices([_device([2, 5, 7, 11, 2, 5, 7, 11, 13, 14])], p, full, head=head)[0]
    assert inside.embedding_delta.shape == (4, 4) and inside.bias_delta.shape == (4,)
    assert np.abs(inside.embedding_delta).sum() > 0
    # A device whose items all lie outside the head has nothing to train on: its update is zero, not its data.
    outside = train_devices([_device([0, 1, 3, 4, 6, 8, 9, 10], key=4)], p, full, head=head)[0]
    assert outside.embedding_delta.shape == (4, 4) and not np.abs(outside.embedding_delta).any()
    with pytest.raises(ValueError, match="head items"):
        train_devices([_device([2, 5, 7])], p, full, head=None)


def test_the_server_applies_a_head_sum_to_the_head_rows_and_ranks_the_tail_by_category():
    config = RunConfig(privacy="user", delta_clip_norm=1.0, trained_items=2, ranking_shrinkage=False)
    start = ItemTables(embedding=np.ones((5, 2), np.float32), bias=np.zeros(5, np.float32))
    server = ItemModelServer(config, start, categories=["a", "b", "a", "a|b", ""])
    server.set_popularity_from_sum(np.array([9.0, 1.0, 8.0, 0.0, 0.0]), reports=10, noise_std=1.0)
    assert server.head.tolist() == [0, 2]
    server.apply_sum(np.array([[200.0, 0.0], [0.0, 200.0]]), np.zeros(2), shares=100, noise_std=1.0, population=100)
    moved = server.tables.embedding
    assert np.all(moved[[1, 3, 4]] == 1.0) and not np.array_equal(moved[0], moved[2])  # the tail is never updated
    serving = server.serving_tables()
    assert np.array_equal(serving.embedding[[0, 2]], moved[[0, 2]])
    assert not serving.embedding[[1, 4]].any()  # category b / none: no trained row to learn from
    assert np.allclose(serving.embedding[3], moved[[0, 2]].mean(axis=0))  # its category a's trained rows
    assert serving.bias[1] > serving.bias[3]  # and the noisy prior orders the tail
    assert fill_tail(moved, None, None) is moved and not fill_tail(moved, server.head, None)[[1, 3, 4]].any()


def test_round_plan_names_the_head_and_the_checkpoint_keeps_prior_and_head(tmp_path):
    head = np.array([0, 3], dtype=np.int64)
    p = round_plan(RunConfig(), 1, 1.0, head)
    assert (p.head_size, p.head_sha256) == (2, head_digest(head))
    assert round_plan(RunConfig(), 1, 1.0).head_size == 0
    records = RunRecords(tmp_path)
    noisy = prior([5.0, 0.0, 0.0, 4.0])
    records.save_checkpoint(Checkpoint(server_round=0, tables=tables(num_items=4), optimizer_state={},
                                       noise_multiplier=1.0, noise_variance=0.0, prior=noisy, head=head))
    back = records.load_checkpoint()
    assert np.array_equal(back.prior.counts, noisy.counts) and back.head.tolist() == [0, 3]


@pytest.mark.parametrize("privacy", ["local", "user"])
def test_a_run_trains_the_head_and_the_audit_re_derives_it(tmp_path, privacy):
    config = RunConfig(devices=40, synthetic_items=60, rounds=2, devices_per_round=20, embedding_dim=4, privacy=privacy,
                       trained_items=15, **({"delta_clip_norm": 0.5} if privacy == "user" else {}))
    result = run_plain(config, engine="cohort", nodes=2)
    assert result.round_trained[-1] > 0
    # The audit side: the recorded prior gives the same head as the plans name; another head is an error.
    server = ItemModelServer(config, tables(num_items=60))
    server.set_prior(prior(np.random.default_rng(0).normal(size=60)))
    assert server.head is not None and len(server.head) == 15
    assert np.array_equal(server.head, trained_head(config, server.prior, 60))
    run = tmp_path / "run"
    records = RunRecords.open(config.replace(out_dir=str(run)), resume=False)
    records.save_checkpoint(Checkpoint(server_round=1, tables=tables(num_items=60), optimizer_state={},
                                       noise_multiplier=1.0, noise_variance=0.0, prior=server.prior, head=server.head))
    good = round_plan(config, 1, 1.0, server.head).to_config()
    other = round_plan(config, 2, 1.0, np.arange(15, dtype=np.int64)).to_config()
    for rnd, p in ((1, good), (2, other)):
        records.append("ledger.jsonl", {"status": "done", "round": rnd, "kind": "train", "attempt": 0, "plan": p,
                                        "privacy_steps": [], "asked": [], "trained": [], "declined": [],
                                        "refused": {}, "rejected": [], "failed": [], "epsilon_reported": {}})
    verdict = audit_run(run)
    codes = [(f["code"], f.get("round")) for f in verdict["flags"]]
    assert ("head_not_from_prior", 2) in codes and ("head_not_from_prior", 1) not in codes
    assert verdict["trained_head"]["re_derived"]["size"] == 15
    json.dumps(verdict)


def test_the_client_app_trains_the_head_it_is_sent_and_refuses_one_its_plan_does_not_name(small_config):
    from flwr.app import Array, ArrayRecord

    from fedrec.client.app import build_client_app
    from fedrec.shared.state import SlotStateStore
    from tests.test_messages import context, train_request

    client = build_client_app(small_config)
    t = tables(num_items=small_config.synthetic_items, dim=small_config.embedding_dim)
    head = np.arange(0, small_config.synthetic_items, 3, dtype=np.int64)
    head_record = ArrayRecord({k: Array(v) for k, v in P.head_to_arrays(head).items()})
    request = train_request(t, 103, num_negatives=4, head_size=len(head), head_sha256=head_digest(head))
    request.content[P.HEAD] = head_record
    reply = client(request, context(3, small_config))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content[P.DELTA][P.EMBEDDING_DELTA].numpy().shape == (len(head), small_config.embedding_dim)
    charged = SlotStateStore(small_config.state_dir, "sim-3").load().rounds
    other = head.copy()
    other[-1] -= 1  # another head than the plan's digest names
    for bad in (ArrayRecord({k: Array(v) for k, v in P.head_to_arrays(other).items()}), None):
        request = train_request(t, 103, server_round=2, num_negatives=4, head_size=len(head),
                                head_sha256=head_digest(head))
        if bad is not None:
            request.content[P.HEAD] = bad
        reply = client(request, context(3, small_config))
        assert reply.has_error() and reply.error.reason == "bad-message"
    assert SlotStateStore(small_config.state_dir, "sim-3").load().rounds == charged  # refused before any charge

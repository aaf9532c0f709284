"""The device: budget enforced before any data is touched, state that survives, corrupt state refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.shared.data.interactions import DataError, DeviceEvents
from fedrec.shared.device import Device, DevicePolicy
from fedrec.shared.privacy.accounting import epsilon
from fedrec.shared.state import DeviceState, FileStateStore, StateError
from tests.helpers import plan, tables

EVENTS = DeviceEvents(items=np.arange(8, dtype=np.int64), times=np.arange(8, dtype=np.int64) * 10,
                      weights=np.ones(8, np.float32))


def device(path, budget=8.0, device_id="dev-a"):
    policy = DevicePolicy(epsilon_budget=budget, embedding_dim=4, init_scale=0.1, seed=0)
    return Device(device_id, 3, EVENTS, FileStateStore(path), policy)


def test_declines_exactly_when_the_next_round_would_exceed_the_budget(tmp_path):
    sigma = 2.0
    eps = [epsilon([(sigma, 1.0, r)], delta=1e-5) for r in (1, 2, 3)]
    d = device(tmp_path / "s.json", budget=(eps[1] + eps[2]) / 2)  # room for exactly two rounds
    outcomes = [d.train(plan(server_round=r, noise_multiplier=sigma), tables()) for r in (1, 2, 3, 4)]
    assert [o.declined for o in outcomes] == [False, False, True, True]
    assert outcomes[1].epsilon == pytest.approx(eps[1]) and outcomes[3].epsilon == pytest.approx(eps[1])
    assert outcomes[2].embedding_delta is None
    state = FileStateStore(tmp_path / "s.json").load()
    assert state.rounds == (1, 2) and state.declined == (3, 4)


@settings(max_examples=15, deadline=None)
@given(sigma=st.floats(0.6, 5.0), budget=st.floats(0.5, 12.0), q=st.sampled_from([0.25, 0.5, 1.0]),
       steps=st.integers(1, 3))
def test_epsilon_never_exceeds_the_budget(tmp_path_factory, sigma, budget, q, steps):
    d = device(tmp_path_factory.mktemp("dev") / "s.json", budget=budget)
    for r in range(1, 7):
        outcome = d.train(plan(server_round=r, noise_multiplier=sigma, sample_rate=q, steps=steps), tables())
        assert outcome.epsilon <= budget
        assert d.epsilon(1e-5) <= budget


def test_state_survives_a_new_device_object(tmp_path):
    path = tmp_path / "s.json"
    first = device(path)
    first.train(plan(server_round=1), tables())
    row = FileStateStore(path).load().user_row
    second = device(path)  # e.g. the process was restarted
    outcome = second.train(plan(server_round=2), tables())
    state = FileStateStore(path).load()
    assert state.rounds == (1, 2) and state.history == ((1.0, 1.0, 2),)
    assert outcome.epsilon == pytest.approx(epsilon([(1.0, 1.0, 2)], delta=1e-5))
    assert not np.array_equal(state.user_row, row)  # training continued from the stored row


def test_corrupt_state_is_refused_not_reset(tmp_path):
    path = tmp_path / "s.json"
    device(path).train(plan(server_round=1), tables())
    raw = path.read_bytes()
    doc = json.loads(raw)
    doc["state"]["history"] = []  # tampered: an attempt to reset the budget
    path.write_text(json.dumps(doc))
    with pytest.raises(StateError, match="checksum mismatch"):
        device(path).train(plan(server_round=2), tables())
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(StateError, match="unreadable device state"):
        device(path).train(plan(server_round=2), tables())


def test_state_of_another_device_is_refused(tmp_path):
    path = tmp_path / "s.json"
    FileStateStore(path).save(DeviceState(device_id="someone-else"))
    with pytest.raises(DataError, match="belongs to 'someone-else'"):
        device(path).train(plan(), tables())


def test_evaluation_reports_only_metrics(tmp_path):
    metrics = device(tmp_path / "s.json").evaluate(tables(), target="test", l2=1.0, sampled_seed=0)
    assert set(metrics) == {"hr@10", "ndcg@10", "recall@20", "sampled_hr@10", "sampled_ndcg@10"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())

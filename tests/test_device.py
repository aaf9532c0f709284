"""The device: budget enforced before any data is touched, state that survives, corrupt state refused."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from fedrec.shared.data.interactions import DataError, DeviceEvents
from fedrec.shared.device import Device, DeviceSettings
from fedrec.shared.eval_release import EvaluationPlan
from fedrec.shared.policy import PrivacyPolicy
from fedrec.shared.privacy.accounting import epsilon
from fedrec.shared.state import DeviceState, FileStateStore, StateError
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import plan, tables

EVENTS = DeviceEvents(items=np.arange(8, dtype=np.int64), times=np.arange(8, dtype=np.int64) * 10,
                      weights=np.ones(8, np.float32))


def device(path, budget=8.0, device_id="dev-a", **policy):
    settings = DeviceSettings(embedding_dim=4, init_scale=0.1, seed=0)
    return Device(device_id, 3, lambda: EVENTS, FileStateStore(path), settings,
                  PrivacyPolicy(epsilon_budget=budget, **policy))


def test_declines_exactly_when_the_next_round_would_exceed_the_budget(tmp_path):
    sigma = 2.0  # two blocks per round: one user step at 2 sigma, one item step at sigma
    per_round = [(sigma, 1.0, 1), (2 * sigma, 1.0, 1)]
    eps = [epsilon([(s, q, n * r) for s, q, n in per_round], delta=1e-5, exact_gaussian=True) for r in (1, 2, 3)]
    d = device(tmp_path / "s.json", budget=(eps[1] + eps[2]) / 2)  # room for exactly two rounds
    outcomes = [d.train(plan(server_round=r, noise_multiplier=sigma, user_noise_multiplier=2 * sigma), tables())
                for r in (1, 2, 3, 4)]
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
    first = device(path, budget=30.0)
    first.train(plan(server_round=1), tables())
    row = FileStateStore(path).load().user_row
    second = device(path, budget=30.0)  # e.g. the process was restarted
    outcome = second.train(plan(server_round=2), tables())
    state = FileStateStore(path).load()
    expected = tuple(sorted(((p.noise_multiplier, 1.0, 2), (p.user_noise_multiplier, 1.0, 2 * p.user_steps))
                            if (p := plan()).user_steps else ((p.noise_multiplier, 1.0, 2),)))
    assert state.rounds == (1, 2) and tuple(sorted(state.history)) == expected
    assert outcome.epsilon == pytest.approx(epsilon(list(expected), delta=1e-5, exact_gaussian=True))  # local mode
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


def test_an_evaluation_release_is_noised_and_charged(tmp_path):
    d = device(tmp_path / "s.json")
    eval_plan = EvaluationPlan(server_round=1, dp=True, noise_multiplier=5.0, delta=1e-5, refit_l2=1.0)
    outcome, metrics = d.evaluate(eval_plan, tables())
    assert set(metrics) == {"hr@10", "ndcg@10", "recall@20"}  # the sampled protocol stays central
    assert FileStateStore(tmp_path / "s.json").load().history == ((5.0, 1.0, 1),)
    assert outcome.epsilon == pytest.approx(epsilon([(5.0, 1.0, 1)], delta=1e-5, exact_gaussian=True))
    assert not all(0.0 <= v <= 1.0 for v in metrics.values()) or eval_plan.metric_std > 1  # noise of std 8.7


def test_an_evaluation_that_fails_after_admission_is_charged(tmp_path, monkeypatch):
    """The server shapes the tables an evaluation ranks with: a failure there (memory) is charged like a release,
    since the charge is written before the data is read."""
    from fedrec.shared import device as device_module

    def out_of_memory(*args, **kwargs):
        raise MemoryError("the tables do not fit")

    monkeypatch.setattr(device_module, "refit_user_row", out_of_memory)
    d = device(tmp_path / "s.json")
    plan = EvaluationPlan(server_round=1, dp=True, noise_multiplier=5.0, delta=1e-5, refit_l2=1.0)
    # Whether it fails can depend on the data (the re-fit grows with the log): never an error, but a release of
    # noised zero metrics, the same reply as a success (a review found the error reply told the two apart).
    outcome, metrics = d.evaluate(plan, tables())
    assert not outcome.declined and set(metrics) == {"hr@10", "ndcg@10", "recall@20"}
    assert FileStateStore(tmp_path / "s.json").load().history == ((5.0, 1.0, 1),)


def test_all_zero_tables_do_not_reveal_the_number_of_distinct_items(tmp_path):
    """With all-zero tables every unseen item ties, so the exact hr@10 would be 10 / #unseen: the release is not."""
    from fedrec.shared.model import ItemTables

    zero = ItemTables(embedding=np.zeros((40, 4), np.float32), bias=np.zeros(40, np.float32))
    d = device(tmp_path / "s.json", budget=100.0)
    exact = 10 / (40 - 6)  # 8 distinct items: 6 train, 1 validation, 1 test; the test item ranks among 34 ties
    released = [d.evaluate(EvaluationPlan(server_round=r, dp=True, noise_multiplier=5.0, delta=1e-5, refit_l2=1.0),
                           zero, nonce=r)[1]["hr@10"] for r in range(1, 4)]
    assert all(abs(v - exact) > 1e-6 for v in released) and len(set(released)) == 3
    assert FileStateStore(tmp_path / "s.json").load().history == ((5.0, 1.0, 3),)  # each release was charged


def test_the_row_user_mode_fits_exactly_never_starts_a_record_level_round(tmp_path):
    """'user' mode fits the user row without noise; a later local or distributed round must start from the row
    that only accounted, noised steps produced, or one record would move every example's gradient."""
    from fedrec.shared.device import train_devices
    from fedrec.shared.distributed_dp import GridSum
    from fedrec.shared.secure_release import training_mechanism

    d = device(tmp_path / "s.json", budget=1e4)
    t = tables()
    initial = d.user_row(d.load_state(), t.dim)
    user = plan(server_round=1, privacy="user", update_clip=0.5, noise_multiplier=1.0, user_noise_multiplier=0.0,
                user_steps=5, user_lr=1.0)
    train_devices([d], user, t, secure=GridSum.zeros(training_mechanism(user, t.num_items, t.dim, 2, 1)), t_min=2,
                  colluders=1)
    state = d.load_state()
    assert state.user_row is None and state.user_row_exact is not None
    assert not np.allclose(state.user_row_exact, initial)
    np.testing.assert_array_equal(d.user_row(state, t.dim, user), state.user_row_exact)
    local = plan(server_round=2)
    np.testing.assert_array_equal(d.user_row(state, t.dim, local), initial)  # data-independent, not the exact row
    d.train(local, t)
    after = d.load_state()
    np.testing.assert_array_equal(after.user_row_exact, state.user_row_exact)  # each mode keeps its own row
    assert after.user_row is not None and not np.allclose(after.user_row, state.user_row_exact)
    assert DeviceState.from_bytes(after.to_bytes(), source="x").user_row_exact is not None  # it is stored


def test_a_failure_while_training_is_charged_so_it_cannot_be_repeated_for_free(tmp_path, monkeypatch):
    """A server can shape a plan so training fails (memory) only above some data size; the round is charged
    before the data is read, so each such probe costs the same budget as a round that trained."""
    from fedrec.shared import training

    def out_of_memory(*args, **kwargs):
        raise MemoryError("the plan's tensors do not fit")

    d = device(tmp_path / "s.json", budget=30.0)
    monkeypatch.setattr(training, "train_cohort", out_of_memory)
    with pytest.raises(MemoryError):
        d.train(plan(server_round=1), tables())
    charged = FileStateStore(tmp_path / "s.json").load()
    assert charged.rounds == (1,) and charged.user_row is None
    monkeypatch.undo()
    trained = device(tmp_path / "t.json", budget=30.0)
    trained.train(plan(server_round=1), tables())
    assert sorted(charged.history) == sorted(FileStateStore(tmp_path / "t.json").load().history)


def test_the_cap_on_the_subverted_figure_declines_exactly_when_the_next_sum_would_pass_it(tmp_path):
    """max-subverted-epsilon: a device declines a secure-sum round whose release would take its epsilon against
    a subverting server (its own noise share alone) past the cap, even with room left in its budget."""
    from fedrec.shared.device import train_devices
    from fedrec.shared.distributed_dp import GridSum, distributed_entries
    from fedrec.shared.secure_release import training_mechanism

    sigma, t_min, colluders = 4.0, 5, 1
    p = plan(privacy="distributed", noise_multiplier=sigma, user_noise_multiplier=2 * sigma, lr=0.5)
    _, _, subverted = distributed_entries(sigma, t_min, colluders)
    user_block = [(2 * sigma, 1.0, p.user_steps)] if p.user_steps else []
    after = [epsilon([(subverted[0], 1.0, r), *[(s, q, n * r) for s, q, n in user_block]], delta=1e-5)
             for r in (1, 2, 3)]
    d = device(tmp_path / "s.json", budget=1e4, max_subverted_epsilon=(after[1] + after[2]) / 2)
    t = tables()
    declined = []
    for r in (1, 2, 3):
        grid = GridSum.zeros(training_mechanism(p, t.num_items, t.dim, t_min, colluders))
        (outcome,) = train_devices([d], replace(p, server_round=r), t, secure=grid, t_min=t_min, colluders=colluders)
        declined.append(outcome.declined)
        assert outcome.epsilon_subverted <= d.policy.max_subverted_epsilon
    assert declined == [False, False, True]
    assert outcome.epsilon_subverted == pytest.approx(after[1])


@pytest.mark.parametrize("exact", [False, True])
def test_a_device_that_wants_exact_clipping_never_uses_ghost_clipping(tmp_path, monkeypatch, exact):
    """Its policy, not the plan, decides: with exact-clipping every block clips per example (hooks)."""
    from fedrec.shared import training

    modes = []
    real = training.make_private
    monkeypatch.setattr(training, "make_private", lambda *a, mode, **k: modes.append(mode) or real(*a, mode=mode, **k))
    outcome = device(tmp_path / "s.json", exact_clipping=exact).train(plan(grad_sample_mode="ghost", user_steps=1),
                                                                        tables())
    assert not outcome.declined
    assert modes == (["hooks", "hooks"] if exact else ["hooks", "ghost"])


def test_an_evaluation_in_a_user_level_run_is_reported_and_budgeted_at_the_user_level(tmp_path):
    """In 'user' mode the record-level figure may pass the budget (twice the sensitivity); an evaluation release
    there (user-level too: its metrics are bounded per device) is held to and reported at the user level, so the
    device neither declines it nor reports a record-level figure the server would reject as over the budget."""
    from fedrec.shared.eval_release import EvaluationPlan
    from fedrec.shared.popularity import PopularityPlan

    d = device(tmp_path / "s.json", budget=3.0)
    report = PopularityPlan(server_round=0, dp=True, noise_multiplier=2.0, delta=1e-5, privacy="user")
    assert d.reserve(report, 10, 1)[0] is None
    record, user = d.figures(d.load_state(), 1e-5, user_level=False)[0], d.figures(d.load_state(), 1e-5,
                                                                                    user_level=True)[0]
    assert user < 3.0 < record
    evaluation = dict(server_round=1, dp=True, noise_multiplier=20.0, delta=1e-5, refit_l2=1.0)
    declined = d.screen(EvaluationPlan(**evaluation))  # read at the record level: past the budget already
    assert declined is not None and declined.declined and declined.epsilon > 3.0
    outcome, metrics = d.evaluate(EvaluationPlan(**evaluation, unit="user"), tables())
    assert not outcome.declined and metrics is not None and user < outcome.epsilon <= 3.0

"""Local DP training: the round plan, clipping and noise, accounting, and cohort = separate devices."""

from __future__ import annotations

import numpy as np
import pytest

from shared.privacy.accounting import epsilon
from shared.training import DeviceTrainingData, PlanError, train_cohort
from tests.helpers import plan, tables


def data(items, seed=0):
    items = np.asarray(items, np.int64)
    return DeviceTrainingData(items=items, weights=np.ones(len(items), np.float32), seed=(7, seed))


def test_plan_round_trip_and_errors():
    p = plan(noise_multiplier=1.3, steps=2)
    assert type(p).from_config(p.to_config()) == p
    config = p.to_config()
    del config["clip-norm"]
    with pytest.raises(PlanError, match="missing key 'clip-norm'"):
        type(p).from_config(config)
    with pytest.raises(PlanError, match="'steps'=1.5 should be int"):
        type(p).from_config({**p.to_config(), "steps": 1.5})
    with pytest.raises(PlanError, match="noise_multiplier=0.0 is out of range"):
        plan(noise_multiplier=0.0)


def test_without_dp_only_touched_rows_move_and_training_is_deterministic():
    t = tables()
    user = np.full((1, 4), 0.2, np.float32)
    run = lambda: train_cohort(plan(dp=False, noise_multiplier=0.0), t, user, [data([1, 2, 3])], [[]], noise_seed=0)
    a, b = run(), run()
    assert np.array_equal(a.embedding_delta, b.embedding_delta)
    moved = np.flatnonzero(np.abs(a.embedding_delta[0]).sum(axis=1))
    assert {1, 2, 3} <= set(moved) and len(moved) < 20
    assert a.histories == [[]]  # no privacy spent, nothing recorded


def test_dp_noise_lands_on_every_row_and_is_accounted():
    update = train_cohort(plan(steps=3, noise_multiplier=1.1), tables(), np.zeros((1, 4), np.float32),
                          [data([1, 2, 3])], [[(2.0, 1.0, 4)]], noise_seed=1)
    assert np.all(np.abs(update.embedding_delta[0]).sum(axis=1) > 0)  # touched items stay hidden
    assert np.all(update.bias_delta[0] != 0)
    assert update.histories == [[(2.0, 1.0, 4), (1.1, 1.0, 3)]]
    assert epsilon(update.histories[0], delta=1e-5) > epsilon([(2.0, 1.0, 4)], delta=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_each_example_is_clipped(mode):
    # with (almost) no noise the update is a sum of clipped per-example gradients: |update| <= lr * C * n
    p = plan(noise_multiplier=1e-9, clip_norm=0.05, lr=1.0, user_lr=1.0, grad_sample_mode=mode)
    update = train_cohort(p, tables(), np.ones((1, 4), np.float32), [data([1, 2, 3, 4])], [[]], noise_seed=0)
    user_step = update.user_rows[0] - 1.0
    norm = np.sqrt(np.sum(update.embedding_delta**2) + np.sum(update.bias_delta**2) + np.sum(user_step**2))
    assert 0.05 < norm <= 1.0 * 0.05 * 4 + 1e-6


def test_poisson_sampling_uses_the_rate():
    p = plan(sample_rate=0.3, steps=40, noise_multiplier=1.0)
    update = train_cohort(p, tables(), np.zeros((1, 4), np.float32), [data(np.arange(20) % 20)], [[]],
                          noise_seed=0)
    assert update.examples_used[0] == pytest.approx(0.3 * 20 * 40, rel=0.2)
    assert update.histories == [[(1.0, 0.3, 40)]]


def test_cohort_equals_separate_devices_without_noise():
    """K devices in one Opacus pass (ghost clipping, stacked tables) = K separate per-device runs."""
    t = tables()
    users = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
    devices = [data([1, 2, 3], seed=0), data([4, 5, 6, 7, 8], seed=1), data([2, 9], seed=2)]
    p = plan(noise_multiplier=1e-9, clip_norm=0.5, steps=2, lr=0.5, user_lr=0.5)
    cohort = train_cohort(p.__class__(**{**p.__dict__, "grad_sample_mode": "ghost"}), t, users, devices,
                          [[], [], []], noise_seed=0)
    for k, device in enumerate(devices):
        alone = train_cohort(p, t, users[k:k + 1], [device], [[]], noise_seed=0)
        np.testing.assert_allclose(cohort.embedding_delta[k], alone.embedding_delta[0], atol=1e-6)
        np.testing.assert_allclose(cohort.bias_delta[k], alone.bias_delta[0], atol=1e-6)
        np.testing.assert_allclose(cohort.user_rows[k], alone.user_rows[0], atol=1e-6)
        assert cohort.histories[k] == alone.histories[0]

"""Local DP training: the round plan, clipping and noise, accounting, and cohort = separate devices."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.shared.privacy.accounting import epsilon
from fedrec.shared.training import DeviceTrainingData, PlanError, train_cohort
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
    p = plan(steps=3, noise_multiplier=1.1, user_noise_multiplier=2.3)
    update = train_cohort(p, tables(), np.zeros((1, 4), np.float32), [data([1, 2, 3])], [[(2.0, 1.0, 4)]],
                          noise_seed=1)
    assert np.all(np.abs(update.embedding_delta[0]).sum(axis=1) > 0)  # touched items stay hidden
    assert np.all(update.bias_delta[0] != 0)
    # both blocks are charged, in the order they ran: the user-row step at its own sigma, then the item steps
    assert update.histories == [[(2.0, 1.0, 4), (2.3, 1.0, 1), (1.1, 1.0, 3)]]
    assert epsilon(update.histories[0], delta=1e-5) > epsilon([(2.0, 1.0, 4)], delta=1e-5)


@pytest.mark.parametrize("user_steps", [0, 1])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_each_example_is_clipped(mode, user_steps):
    """With (almost) no noise an update is a sum of clipped per-example gradients: |update| <= lr * C * n.

    One block (user_steps=0): user row and items share each example's budget C. Two blocks (the default): the
    user-row step and the item step each clip every example to C on their own parameters.
    """
    p = plan(noise_multiplier=1e-9, clip_norm=0.05, lr=1.0, user_lr=1.0, grad_sample_mode=mode, user_steps=user_steps)
    assert p.user_noise_multiplier < 1e-8  # the user block is noiseless too
    update = train_cohort(p, tables(), np.ones((1, 4), np.float32), [data([1, 2, 3, 4])], [[]], noise_seed=0)
    user_norm = np.linalg.norm(update.user_rows[0] - 1.0)
    item_norm = np.sqrt(np.sum(update.embedding_delta**2) + np.sum(update.bias_delta**2))
    bound = 1.0 * 0.05 * 4 + 1e-6
    blocks = [np.hypot(user_norm, item_norm)] if user_steps == 0 else [user_norm, item_norm]
    for norm in blocks:  # unclipped, these updates are > 1 (clipping binds)
        assert 0.05 < norm <= bound


@pytest.mark.parametrize("requested", ["ghost", "auto"])
def test_the_user_row_is_clipped_from_the_gradients_it_receives_whatever_the_plan_asks(monkeypatch, requested):
    """Ghost clipping measures norms and applies gradients in two float32 passes; where an example's user-row gradient
    cancels (tables a server can craft) the two disagree. A block that trains the user row uses per-example
    gradients."""
    from fedrec.shared import training

    modes = []
    real = training.make_private
    monkeypatch.setattr(training, "make_private", lambda *a, mode, **k: modes.append(mode) or real(*a, mode=mode, **k))
    monkeypatch.setattr(training, "HOOKS_MEMORY_LIMIT_BYTES", 0)  # 'auto' would take ghost for any size
    for user_steps in (1, 0):
        p = plan(noise_multiplier=1.0, grad_sample_mode=requested, user_steps=user_steps)
        train_cohort(p, tables(), np.ones((1, 4), np.float32), [data([1, 2, 3, 4])], [[]], noise_seed=0)
    assert modes == ["hooks", "ghost", "hooks"]  # user block, item block as asked; one block for both: hooks


def test_poisson_sampling_uses_the_rate():
    p = plan(sample_rate=0.3, steps=40, user_steps=2, noise_multiplier=1.0)
    update = train_cohort(p, tables(), np.zeros((1, 4), np.float32), [data(np.arange(20) % 20)], [[]],
                          noise_seed=0)
    assert update.examples_used[0] == pytest.approx(0.3 * 20 * (40 + 2), rel=0.2)  # both blocks sample at q
    assert update.histories == [[(2.0, 0.3, 2), (1.0, 0.3, 40)]]


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


@pytest.mark.parametrize("user_steps", [0, 1])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_cohort_noise_has_the_per_device_scale(mode, user_steps):
    """With noise on, rows no example touched move by pure noise: std lr * sigma * C per coordinate,
    in a cohort of 8 devices exactly as for one device alone (checked statistically). With a user block
    first (the default), the item step's noise is unchanged: the user block's sigma never reaches the items."""
    t = tables(num_items=400, dim=8)
    p = plan(steps=1, user_steps=user_steps, user_noise_multiplier=3.0, lr=0.5, noise_multiplier=1.3, clip_norm=0.7,
             num_negatives=2, train_biases=True, grad_sample_mode=mode)
    devices = [data([k, k + 1, k + 2], seed=k) for k in range(8)]
    expected = p.lr * p.noise_multiplier * p.clip_norm

    def untouched_std(update, k_devices):
        emb = update.embedding_delta.reshape(k_devices, 400, 8)
        moved_by_noise = emb[:, 50:, :]  # positives are items < 10; negatives touch at most 6 of 400 rows each
        return float(np.median(np.std(moved_by_noise, axis=(1, 2))))

    cohort = train_cohort(p, t, np.zeros((8, 8), np.float32), devices, [[]] * 8, noise_seed=11)
    alone = [train_cohort(p, t, np.zeros((1, 8), np.float32), [d], [[]], noise_seed=20 + k)
             for k, d in enumerate(devices)]
    assert untouched_std(cohort, 8) == pytest.approx(expected, rel=0.05)
    assert np.median([untouched_std(a, 1) for a in alone]) == pytest.approx(expected, rel=0.05)
    # noise is independent across the devices of a cohort
    emb = cohort.embedding_delta.reshape(8, 400, 8)[:, 50:, :].reshape(8, -1)
    assert np.abs(np.corrcoef(emb)[np.triu_indices(8, 1)]).max() < 0.1
    assert cohort.histories == [alone[0].histories[0]] * 8
    assert sorted(cohort.histories[0]) == sorted(p.privacy_steps())  # what the device's budget check charged


def test_fast_embedding_norms_equal_opacus():
    """The masked-Gram per-example norms (shared/privacy/embedding_norms.py) = Opacus's torch.unique ones."""
    import torch
    from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample

    from fedrec.shared.privacy.embedding_norms import RowEmbedding, lookup_norms

    layer = RowEmbedding(30, 5)
    gen = torch.Generator().manual_seed(0)
    for lookups in (1, 17, 80):  # one user row; a positive and negatives (repeats likely); the long fallback
        ids = torch.randint(0, 8, (200, lookups), generator=gen)
        grads = torch.randn(200, lookups, 5, generator=gen)
        ours = lookup_norms(layer, [ids], grads)[layer.weight]
        theirs = compute_embedding_norm_sample(layer, [ids], grads)[layer.weight]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("train_biases", [False, True])
def test_the_distributed_item_step_is_exact_whatever_the_table_values(mode, train_biases):
    """Distributed mode sends the noise-free item step into the sum: it must be -lr x the clipped gradient sum
    (|delta| <= lr C n), not a difference of float32 tables, whose rounding at values a server may send (1000:
    steps of 6e-5) would swamp a step of lr C = 1e-6 and leave the accounted sensitivity behind."""
    from fedrec.shared.model import ItemTables

    base = tables(num_items=20, dim=4)
    t = ItemTables(embedding=(base.embedding + 1000.0).astype(np.float32), bias=(base.bias + 1000.0).astype(np.float32))
    p = plan(privacy="distributed", noise_multiplier=1.0, user_noise_multiplier=2.0, clip_norm=1e-3, lr=1e-3,
             grad_sample_mode=mode, train_biases=train_biases, num_negatives=3)
    update = train_cohort(p, t, np.ones((1, 4), np.float32), [data([1, 2, 3, 4])], [[]], noise_seed=0)
    raw_bias = update.bias_delta / p.bias_scale
    norm = np.sqrt(np.sum(update.embedding_delta.astype(np.float64) ** 2) + np.sum(raw_bias.astype(np.float64) ** 2))
    assert 0 < norm <= 1e-3 * 1e-3 * 4 * (1 + 1e-6)
    assert train_biases or not update.bias_delta.any()

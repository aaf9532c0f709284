"""An empty Poisson batch (q < 1 on a small local dataset) is an ordinary DP step in both Opacus modes.

Whether a batch is empty depends on the private data size, so it must neither crash (the failure would reach
the server) nor look different: zero clipped gradient, full noise N(0, (sigma C)^2) on every coordinate, and
the step charged to the device's privacy history, in ghost mode exactly as in hooks mode.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedrec.shared.privacy.accounting import compact_history
from fedrec.shared.privacy.embedding_norms import GRAM_MAX_LOOKUPS, RowEmbedding, lookup_norms
from fedrec.shared.training import DeviceTrainingData, LocalTrainingPlan, train_cohort
from tests.helpers import plan, tables

EMPTY_Q = 1e-6  # with a handful of interactions no example is ever sampled (each test checks examples_used == 0)
PRIOR = [(2.0, 0.5, 3)]  # a history from earlier rounds


def interactions(items: list[int] | np.ndarray, seed: int = 0) -> DeviceTrainingData:
    items = np.asarray(items, np.int64)
    return DeviceTrainingData(items=items, weights=np.ones(len(items), np.float32), seed=(5, seed))


def noisy_plan(**changes: object) -> LocalTrainingPlan:
    return plan(sample_rate=EMPTY_Q, steps=2, lr=0.5, user_lr=0.3, noise_multiplier=1.3, user_noise_multiplier=2.0,
                clip_norm=0.7, num_negatives=2, **changes)


def item_noise_std(p: LocalTrainingPlan) -> float:
    return p.lr * p.noise_multiplier * p.clip_norm * np.sqrt(p.steps)


def user_noise_std(p: LocalTrainingPlan) -> float:
    sigma, steps = (p.user_noise_multiplier, p.user_steps) if p.user_steps else (p.noise_multiplier, p.steps)
    return p.user_lr * p.user_scale * sigma * p.clip_norm * np.sqrt(steps)


def charged(history: list[tuple[float, float, int]], p: LocalTrainingPlan) -> bool:
    """The history is PRIOR plus every step of the round (both blocks); RDP composition is order-free."""
    return sorted(history) == sorted(compact_history([*PRIOR, *p.privacy_steps()]))


@pytest.mark.parametrize("lookups", [(), (3,), (GRAM_MAX_LOOKUPS + 1,)])
def test_norms_of_an_empty_batch_are_empty(lookups):
    """The root cause: the ghost-clipping norm sampler reshaped 0 ids to [0, -1] (ambiguous); Opacus's own
    sampler, used for long lookups, fails the same way."""
    layer = RowEmbedding(10, 4)
    norms = lookup_norms(layer, [torch.zeros((0, *lookups), dtype=torch.int64)], torch.zeros((0, *lookups, 4)))
    assert norms[layer.weight].shape == (0,)


@pytest.mark.parametrize("user_steps", [0, 1])
def test_an_empty_batch_in_ghost_mode_is_the_full_noise_step_of_hooks_mode(user_steps):
    t = tables(num_items=300, dim=8)
    p = noisy_plan(user_steps=user_steps)
    user = np.zeros((1, 8), np.float32)

    def run(mode: str, noise_seed: int):
        return train_cohort(replace(p, grad_sample_mode=mode), t, user, [interactions([3])], [PRIOR],
                            noise_seed=noise_seed)

    ghost = [run("ghost", seed) for seed in range(3)]
    hooks = [run("hooks", 100 + seed) for seed in range(3)]
    for update in ghost + hooks:
        assert update.examples_used[0] == 0  # the batch was empty in every step
        assert charged(update.histories[0], p)  # every step charged, as for a full batch
    for mode in (ghost, hooks):  # pure noise on every coordinate, at the full per-step scale
        deltas = np.concatenate([np.r_[u.embedding_delta.ravel(), u.bias_delta.ravel()] for u in mode])
        assert abs(deltas.mean()) < 0.05 * item_noise_std(p)
        assert deltas.std() == pytest.approx(item_noise_std(p), rel=0.05)
    same_draw = run("hooks", 0)  # same noise seed: the same mechanism gives the same release
    np.testing.assert_allclose(ghost[0].embedding_delta, same_draw.embedding_delta, atol=1e-6)
    np.testing.assert_allclose(ghost[0].bias_delta, same_draw.bias_delta, atol=1e-6)
    np.testing.assert_allclose(ghost[0].user_rows, same_draw.user_rows, atol=1e-6)


@pytest.mark.parametrize("user_steps", [0, 1])
def test_a_cohort_of_empty_batches_gets_per_device_noise_and_accounting(user_steps):
    """Every device of a ghost-mode cohort sampled nothing: the whole stacked batch is empty."""
    k_devices, dim = 16, 16
    t = tables(num_items=100, dim=dim)
    p = noisy_plan(user_steps=user_steps, grad_sample_mode="ghost")
    devices = [interactions([k % 100], seed=k) for k in range(k_devices)]
    users = np.zeros((k_devices, dim), np.float32)
    update = train_cohort(p, t, users, devices, [PRIOR] * k_devices, noise_seed=4)
    assert update.examples_used.tolist() == [0] * k_devices
    assert all(charged(h, p) for h in update.histories)
    per_device = np.std(update.embedding_delta.reshape(k_devices, -1), axis=1)
    assert np.median(per_device) == pytest.approx(item_noise_std(p), rel=0.05)
    assert update.user_rows.std() == pytest.approx(user_noise_std(p), rel=0.15)  # the user block's own sigma
    hooks = train_cohort(replace(p, grad_sample_mode="hooks"), t, users, devices, [PRIOR] * k_devices, noise_seed=4)
    np.testing.assert_allclose(update.embedding_delta, hooks.embedding_delta, atol=1e-6)
    np.testing.assert_allclose(update.user_rows, hooks.user_rows, atol=1e-6)


@pytest.mark.parametrize("user_steps", [0, 1])
def test_a_cohort_mixing_empty_and_full_batches_equals_separate_devices(user_steps):
    """(Almost) no noise: a ghost-mode cohort where some devices sampled nothing = each device alone."""
    t = tables(num_items=50, dim=4)
    p = plan(sample_rate=0.02, steps=2, user_steps=user_steps, noise_multiplier=1e-9, clip_norm=0.5, lr=0.5,
             user_lr=0.5, grad_sample_mode="ghost")
    devices = [interactions([7], seed=2), interactions(np.arange(400) % 50, seed=1), interactions([9], seed=4),
               interactions(np.arange(300) % 50, seed=3)]
    users = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
    cohort = train_cohort(p, t, users, devices, [PRIOR] * 4, noise_seed=0)
    assert cohort.examples_used[[0, 2]].tolist() == [0, 0] and (cohort.examples_used[[1, 3]] > 0).all()
    for k, device in enumerate(devices):
        for mode in ("ghost", "hooks"):
            alone = train_cohort(replace(p, grad_sample_mode=mode), t, users[k:k + 1], [device], [PRIOR],
                                 noise_seed=0)
            np.testing.assert_allclose(cohort.embedding_delta[k], alone.embedding_delta[0], atol=1e-6)
            np.testing.assert_allclose(cohort.bias_delta[k], alone.bias_delta[0], atol=1e-6)
            np.testing.assert_allclose(cohort.user_rows[k], alone.user_rows[0], atol=1e-6)
            assert alone.histories[0] == cohort.histories[k] and charged(alone.histories[0], p)
    assert np.abs(cohort.embedding_delta[[0, 2]]).max() < 1e-6  # the empty devices moved by their (tiny) noise only


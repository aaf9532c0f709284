"""The server's randomness: seeded in simulation, OS entropy in deployment, fresh for every round attempt."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
from flwr.superlink.grid import InMemoryGrid

from fedrec.server.core import (
    CENTRAL_NOISE_SALT,
    TRAIN_SALT,
    ItemModelServer,
    ServerRandomness,
    sample_devices,
)
from fedrec.shared.aggregation import PartialSum
from fedrec.shared.config import RunConfig
from fedrec.shared.model import ItemTables
from tests.helpers import plan

CONFIG = RunConfig(central_noise_multiplier=1.0, delta_clip_norm=1.0, devices_per_round=4, seed=11)
DEVICES = [f"d{k}" for k in range(1000)]


def noisy_round(randomness: ServerRandomness, *, attempt: int = 0) -> np.ndarray:
    """The item embeddings after one central-noise round with the same (zero) updates."""
    server = ItemModelServer(CONFIG, ItemTables(embedding=np.zeros((6, 3), np.float32), bias=np.zeros(6, np.float32)))
    total = PartialSum.zeros(6, 3)
    total.add((np.ones((6, 3), np.float32), np.zeros(6, np.float32)), clip=1.0)
    server.apply(total, plan(dp=False, noise_multiplier=0.0), population=10,
                 rng=randomness.for_round(1, attempt, CENTRAL_NOISE_SALT))
    return server.tables.embedding


def test_deployment_noise_is_fresh_and_not_derived_from_the_seed():
    first, second = ServerRandomness.from_os(), ServerRandomness.from_os()
    assert not first.reproducible and "OS entropy" in first.describe()
    assert not np.array_equal(noisy_round(first), noisy_round(second))
    assert not np.array_equal(noisy_round(first), noisy_round(first))  # even the same object, same round
    assert not np.array_equal(noisy_round(first), noisy_round(ServerRandomness.seeded(CONFIG.seed)))
    assert sample_devices(DEVICES, 50, rng=first.for_round(1, 0, TRAIN_SALT)) != \
        sample_devices(DEVICES, 50, rng=second.for_round(1, 0, TRAIN_SALT))


def test_simulation_is_reproducible_for_the_same_seed():
    a, b = ServerRandomness.seeded(CONFIG.seed), ServerRandomness.seeded(CONFIG.seed)
    assert a.reproducible and f"seed {CONFIG.seed}" in a.describe() and "not secret" in a.describe()
    np.testing.assert_array_equal(noisy_round(a), noisy_round(b))
    assert not np.array_equal(noisy_round(a), noisy_round(ServerRandomness.seeded(CONFIG.seed + 1)))
    for poisson in (False, True):
        assert sample_devices(DEVICES, 50, rng=a.for_round(3, 0, TRAIN_SALT), poisson=poisson) == \
            sample_devices(DEVICES, 50, rng=b.for_round(3, 0, TRAIN_SALT), poisson=poisson)


def test_every_attempt_of_a_round_gets_fresh_noise_even_when_seeded():
    seeded = ServerRandomness.seeded(CONFIG.seed)
    assert not np.array_equal(noisy_round(seeded, attempt=0), noisy_round(seeded, attempt=1))
    np.testing.assert_array_equal(noisy_round(seeded, attempt=1), noisy_round(seeded, attempt=1))


def test_only_the_in_memory_simulation_grid_is_seeded():
    assert ServerRandomness.for_grid(Mock(spec=InMemoryGrid), 5) == ServerRandomness.seeded(5)
    assert not ServerRandomness.for_grid(Mock(), 5).reproducible  # a deployment's grid, or anything unknown

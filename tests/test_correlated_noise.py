"""The bounds on what correlated noise across rounds could gain (shared/privacy/correlated_noise.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.shared.privacy.correlated_noise import (
    best_factorization_gain,
    cohort_noise_ratio,
    factorization_cost,
    prefix_gain_bound,
    prefix_matrix,
    rounds_charged,
)


def sqrt_factor(rounds: int) -> np.ndarray:
    """The square-root factorisation C = A^(1/2): Toeplitz, coefficients binom(2k, k) / 4^k."""
    coef = [1.0]
    for k in range(1, rounds):
        coef.append(coef[-1] * (2 * k - 1) / (2 * k))
    c = np.zeros((rounds, rounds))
    for i in range(rounds):
        c[i, : i + 1] = coef[: i + 1][::-1]
    return c


@settings(max_examples=40, deadline=None)
@given(rounds=st.integers(1, 24), seed=st.integers(0, 2**31 - 1))
def test_no_factorisation_beats_the_bounds(rounds, seed):
    """Any invertible C with B = A C^-1: the total cost is at least the nuclear-norm bound, and the served (last)
    prefix sum is at least as noisy as with independent noise."""
    rng = np.random.default_rng(seed)
    a = prefix_matrix(rounds)
    c = np.tril(rng.normal(size=(rounds, rounds))) + np.eye(rounds) * (1 + rounds)
    b = a @ np.linalg.inv(c)
    nuclear = float(np.sum(np.linalg.svd(a, compute_uv=False)))
    assert factorization_cost(b, c) >= nuclear**2 * (1 - 1e-9)
    last = float(np.sum(b[-1] ** 2)) * float(np.sum((c @ np.ones(rounds)) ** 2))
    assert last >= rounds**2 * (1 - 1e-9)
    # Independent noise: cost T ||A||_F^2, and the last prefix exactly at its bound T^2.
    identity = np.eye(rounds)
    assert factorization_cost(a, identity) == pytest.approx(rounds * np.sum(a * a))
    assert float(np.sum(a[-1] ** 2)) * rounds == pytest.approx(rounds**2)


def test_the_square_root_factorisation_sits_between_independent_noise_and_the_bound():
    rounds = 50
    a, c = prefix_matrix(rounds), sqrt_factor(rounds)
    np.testing.assert_allclose(c @ c, a, atol=1e-9)
    gain = math.sqrt(factorization_cost(a, np.eye(rounds)) / factorization_cost(c, c))
    assert 1.0 < gain <= prefix_gain_bound(rounds)


def test_the_best_factorisation_for_every_round_gains_little():
    """With the aligned-contribution sensitivity counted, the square-root factorisation loses to independent noise,
    and the optimum stays far under the nuclear-norm bound (docs/results.md)."""
    rounds = 30
    a, c = prefix_matrix(rounds), sqrt_factor(rounds)
    aligned = float(np.sum((c @ np.ones(rounds)) ** 2))
    assert math.sqrt(factorization_cost(a, np.eye(rounds)) / (np.sum(c * c) * max(aligned, np.sum(c * c)))) < 1
    best = best_factorization_gain(rounds)
    assert 1.0 <= best < 1.2 < prefix_gain_bound(rounds)
    assert best_factorization_gain(1) == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(rounds=st.integers(2, 16), seed=st.integers(0, 2**31 - 1))
def test_the_dual_bound_holds_for_any_factorisation(rounds, seed):
    """No factorisation, costed with the relaxed sensitivity max(trace X, 1^T X 1), gains more than the bound."""
    rng = np.random.default_rng(seed)
    a = prefix_matrix(rounds)
    c = np.tril(rng.normal(size=(rounds, rounds))) + np.eye(rounds) * rng.uniform(0.5, 1 + rounds)
    x = c.T @ c
    cost = np.trace(a.T @ a @ np.linalg.inv(x)) * max(np.trace(x), np.ones(rounds) @ x @ np.ones(rounds))
    assert math.sqrt(rounds * np.sum(a * a) / cost) <= best_factorization_gain(rounds) * (1 + 1e-9)


def test_pinned_values():
    assert prefix_gain_bound(1) == pytest.approx(1.0)
    assert prefix_gain_bound(50) == pytest.approx(2.57, abs=0.005)
    assert rounds_charged(50, 100, 610) == 12  # binomial(50, 100/610), 90th percentile
    assert cohort_noise_ratio(50, 100, 610) == pytest.approx(math.sqrt(12) / 100 / (math.sqrt(50) / 610))
    assert cohort_noise_ratio(50, 610, 610) == pytest.approx(1.0)

"""The empirical bounds' math: the one-run lower bound (Steinke et al. 2023) and the one-shot estimate (Andrew et al.
2024), against closed forms and a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from fedrec.simulation import audit_bounds as b


def test_all_right_without_delta_is_the_closed_form():
    # delta = 0: P[Bin(r, p) = r] = p^r < 0.05  <=>  eps > -log(20^(1/r) - 1)
    for r in (10, 100, 1000):
        expected = -math.log(20 ** (1 / r) - 1)
        assert b.one_run_max_bound(canaries=r, guesses=r, delta=0.0) == pytest.approx(expected, abs=1e-6)
    assert b.one_run_max_bound(canaries=100, guesses=100, delta=0.0) == pytest.approx(3.4930, abs=1e-4)  # pinned


def test_bound_saturates_with_delta():
    # A few hundred guesses: the bound at delta 1e-5 cannot pass about 5, whatever the attack (the example).
    assert 4.0 < b.one_run_max_bound(canaries=1000, guesses=300, delta=1e-5) < 5.5
    assert b.one_run_max_bound(canaries=1000, guesses=300, delta=1e-5) \
        < b.one_run_max_bound(canaries=1000, guesses=300, delta=0.0)


def test_random_guessing_finds_nothing():
    assert b.one_run_lower_bound(canaries=1000, guesses=1000, correct=500, delta=1e-5) == 0.0
    rng = np.random.default_rng(0)
    present = rng.random(2000) < 0.5
    guesses, correct = b.guess_from_scores(rng.random(2000), present, per_side=300)
    assert guesses == 600 and b.one_run_lower_bound(canaries=2000, guesses=guesses, correct=correct,
                                                    delta=1e-5) < 0.3


def test_p_value_matches_brute_force():
    # Appendix D of Steinke et al.: beta + 2 m delta max_i P[v - i <= Bin < v] / i, summed term by term.
    m, r, v, eps, delta = 200, 60, 50, 1.5, 1e-4
    p = 1 / (1 + math.exp(-eps))
    alpha = max(sum(binom.pmf(v - j, r, p) for j in range(1, i + 1)) / i for i in range(1, v + 1))
    expected = binom.sf(v - 1, r, p) + 2 * m * delta * alpha
    assert b.one_run_p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta) == pytest.approx(expected)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.data())
def test_bound_grows_with_correct_guesses_and_never_passes_the_max(guesses, data):
    correct = data.draw(st.integers(0, guesses))
    delta = data.draw(st.sampled_from([0.0, 1e-6, 1e-5]))
    bound = b.one_run_lower_bound(canaries=guesses, guesses=guesses, correct=correct, delta=delta)
    top = b.one_run_max_bound(canaries=guesses, guesses=guesses, delta=delta)
    assert 0.0 <= bound <= top + 1e-9
    if correct < guesses:
        assert bound <= b.one_run_lower_bound(canaries=guesses, guesses=guesses, correct=correct + 1,
                                              delta=delta) + 1e-9
    if correct <= guesses / 2:
        assert bound == 0.0


def test_the_bound_is_a_level_test():
    # Randomized response at eps 1 is exactly 1-DP: the bound at eps-level confidence passes 1 in at most ~5% of runs.
    rng = np.random.default_rng(1)
    p = 1 / (1 + math.exp(-1.0))
    over = sum(b.one_run_lower_bound(canaries=400, guesses=400, correct=int(rng.binomial(400, p)), delta=0.0) > 1.0
               for _ in range(200))
    assert over <= 20


def test_gaussian_pair_matches_the_analytic_gaussian_mechanism():
    for mu in (0.5, 1.0, 2.0):
        exact = b.analytic_gaussian_epsilon(mu, 1e-5)
        numeric = b.gaussian_pair_epsilon(null_mean=0.0, null_std=1.0, mean=mu, std=1.0, delta=1e-5)
        assert numeric == pytest.approx(exact, rel=1e-3)
    # an independent library: dp-accounting's PLD of the Gaussian mechanism at sigma 1
    from dp_accounting.pld import privacy_loss_distribution as pld

    reference = pld.from_gaussian_mechanism(1.0, value_discretization_interval=1e-5).get_epsilon_for_delta(1e-5)
    assert b.analytic_gaussian_epsilon(1.0, 1e-5) == pytest.approx(reference, abs=1e-3)
    assert reference == pytest.approx(4.3772, abs=1e-3)


def test_one_shot_estimate_finds_a_planted_gaussian_and_nothing_in_the_null():
    d, rng = 10_000, np.random.default_rng(2)
    planted = rng.normal(1.0 / math.sqrt(d), 1.0 / math.sqrt(d), 5000)  # mu / sigma = 1
    assert b.one_shot_estimate(planted, dimension=d, delta=1e-5) == pytest.approx(4.38, abs=0.5)
    null = rng.normal(0.0, 1.0 / math.sqrt(d), 5000)
    assert b.one_shot_estimate(null, dimension=d, delta=1e-5) < 0.5


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="guesses"):
        b.one_run_p_value(canaries=5, guesses=10, correct=3, epsilon=1.0, delta=0.0)

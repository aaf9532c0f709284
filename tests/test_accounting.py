"""Record-level accounting: pinned published values, an independent library, and properties."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fedrec.shared.privacy.accounting import (
    RDP_ORDERS,
    calibrate_noise_multiplier,
    compact_history,
    epsilon,
    epsilon_after,
    normalize_history,
)


def independent_epsilon(history, delta):
    """The same composition through Google's dp-accounting (its own RDP code, same orders)."""
    accountant = RdpAccountant(orders=list(RDP_ORDERS))
    for sigma, q, steps in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def test_opacus_pinned_value():
    # opacus/tests/accountants_test.py: RDP, sigma 1.5, q 0.04, 2250 steps, delta 1e-5
    assert epsilon([(1.5, 0.04, 2250)], delta=1e-5) == pytest.approx(7.32911117143, abs=1e-9)


@pytest.mark.parametrize("history", [
    [(1.5, 0.04, 2250)],
    [(1.1, 1.0, 3)],
    [(0.9, 0.25, 10), (2.0, 1.0, 4)],
    [(4.0, 0.01, 10_000)],
])
def test_matches_opacus_accountant_and_dp_accounting(history):
    ours = epsilon(history, delta=1e-5)
    opacus_accountant = RDPAccountant()
    opacus_accountant.history = list(history)
    assert ours == pytest.approx(opacus_accountant.get_epsilon(1e-5), rel=1e-12)
    # dp-accounting drops orders where its series does not converge, so allow a small relative gap.
    assert ours == pytest.approx(independent_epsilon(history, 1e-5), rel=1e-3)


def test_no_steps_means_no_epsilon():
    assert epsilon([], delta=1e-5) == 0.0


def test_compacting_merges_equal_mechanisms_and_keeps_epsilon():
    history = [(1.0, 0.5, 2), (2.0, 0.5, 1), (1.0, 0.5, 3), (2.0, 0.25, 0)]
    assert compact_history(history) == [(1.0, 0.5, 5), (2.0, 0.5, 1)]
    assert epsilon(compact_history(history), delta=1e-5) == pytest.approx(epsilon(history, delta=1e-5), rel=1e-12)


def test_bad_history_entries_are_named():
    with pytest.raises(ValueError, match="entry 1"):
        normalize_history([(1.0, 0.5, 1), (0.0, 0.5, 1)])


sigmas = st.floats(min_value=0.5, max_value=20.0)
rates = st.floats(min_value=0.001, max_value=1.0)


@settings(max_examples=60, deadline=None)
@given(sigma=sigmas, q=rates, steps=st.integers(1, 500), more=st.integers(1, 500))
def test_epsilon_never_decreases_with_more_steps(sigma, q, steps, more):
    before = epsilon([(sigma, q, steps)], delta=1e-5)
    after = epsilon_after([(sigma, q, steps)], [(sigma, q, more)], delta=1e-5)
    assert after >= before


@settings(max_examples=40, deadline=None)
@given(sigma=sigmas, q=rates, steps=st.integers(1, 200))
def test_epsilon_decreases_with_more_noise(sigma, q, steps):
    assert epsilon([(sigma * 1.5, q, steps)], delta=1e-5) <= epsilon([(sigma, q, steps)], delta=1e-5)


@settings(max_examples=8, deadline=None)
@given(target=st.floats(0.5, 16.0), q=st.floats(0.01, 1.0), steps=st.integers(1, 100))
def test_calibrated_sigma_meets_the_target_tightly(target, q, steps):
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps)
    assert epsilon([(sigma, q, steps)], delta=1e-5) <= target
    assert epsilon([(sigma - 2e-3, q, steps)], delta=1e-5) > target * 0.98


@pytest.mark.parametrize("privacy", ["local", "distributed", "user"])
def test_a_budget_the_fixed_releases_alone_spend_is_refused_by_name(privacy):
    from fedrec.server.core import noise_multiplier_for
    from fedrec.shared.config import ConfigError, RunConfig

    config = RunConfig().replace(privacy=privacy, epsilon_budget=8.0, prior_noise_multiplier=0.01)
    with pytest.raises(ConfigError, match="prior-noise-multiplier=0.01.*alone exceed epsilon 8.0"):
        noise_multiplier_for(config, 500)
    assert noise_multiplier_for(config.replace(prior_noise_multiplier=5.0), 500) > 0  # a fitting prior passes

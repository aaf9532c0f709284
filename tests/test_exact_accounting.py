"""Exact accounting of plain Gaussian compositions (local mode): an upper bound, tighter than RDP, pinned values."""

from __future__ import annotations

import logging

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from fedrec.server.core import noise_multiplier_for, popularity_plan
from fedrec.shared.config import RunConfig
from fedrec.shared.data.interactions import DeviceEvents
from fedrec.shared.device import Device, DeviceSettings
from fedrec.shared.popularity import PopularityPlan
from fedrec.shared.policy import PrivacyPolicy
from fedrec.shared.privacy.accounting import epsilon, gaussian_delta, gaussian_epsilon
from fedrec.shared.state import DeviceState, MemoryStateStore
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import plan, tables

logging.getLogger("absl").setLevel(logging.ERROR)
DELTA = 1e-5


def test_pinned_analytic_gaussian_value():
    # Balle & Wang 2018 (analytic Gaussian mechanism): sigma = 3.73 gives epsilon 1 at delta 1e-5 (the classical
    # bound needs 4.84). One release at sigma = 1: epsilon 4.3772 (RDP says 4.73).
    assert gaussian_epsilon([(3.73, 1.0, 1)], delta=DELTA) == pytest.approx(1.0, abs=5e-4)
    assert gaussian_epsilon([(1.0, 1.0, 1)], delta=DELTA) == pytest.approx(4.37718, abs=1e-4)
    assert epsilon([(1.0, 1.0, 1)], delta=DELTA) == pytest.approx(4.7285, abs=1e-3)  # RDP unless asked
    assert epsilon([(1.0, 1.0, 1)], delta=DELTA, exact_gaussian=True) == pytest.approx(4.37718, abs=1e-4)


def pld(history) -> float:
    accountant = PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, n in history:
        accountant.compose(dp_accounting.GaussianDpEvent(sigma), n)
    return float(accountant.get_epsilon(DELTA))


histories = st.lists(st.tuples(st.floats(0.5, 20.0), st.just(1.0), st.integers(1, 200)), min_size=1, max_size=4)


@pytest.mark.e2e  # 25 PLD accountings: minutes on 2 cores
@settings(max_examples=25, deadline=None)
@given(histories)
def test_exact_figure_matches_pld_and_never_exceeds_rdp(history):
    exact = gaussian_epsilon(history, delta=DELTA)
    assert exact <= epsilon(history, delta=DELTA) + 1e-9
    assert exact == pytest.approx(pld(history), rel=1e-4, abs=1e-4)
    # an upper bound: at the stated epsilon the exact profile's delta is within the target
    mu = np.sqrt(sum(n / s**2 for s, _, n in history))
    assert gaussian_delta(exact, mu) <= DELTA


@settings(max_examples=25, deadline=None)
@given(histories, st.tuples(st.floats(0.5, 20.0), st.just(1.0), st.integers(1, 50)))
def test_exact_figure_grows_with_every_release(history, more):
    assert gaussian_epsilon([*history, more], delta=DELTA) >= gaussian_epsilon(history, delta=DELTA)


def test_subsampled_steps_keep_rdp():
    history = [(1.0, 0.1, 100), (2.0, 1.0, 1)]
    assert gaussian_epsilon(history, delta=DELTA) is None
    assert epsilon(history, delta=DELTA, exact_gaussian=True) == epsilon(history, delta=DELTA)


def _device(store=None) -> Device:
    events = DeviceEvents(items=np.arange(8, dtype=np.int64), times=np.arange(8, dtype=np.int64),
                          weights=np.ones(8, np.float32))
    return Device("dev-a", 3, lambda: events, store or MemoryStateStore(), DeviceSettings(4, 0.1, 0),
                  PrivacyPolicy(epsilon_budget=8.0))


def test_a_local_device_accounts_exactly_and_a_secure_release_returns_it_to_rdp():
    device = _device()
    outcome = device.train(plan(noise_multiplier=1.5, user_noise_multiplier=3.0), tables())
    history = [(1.5, 1.0, 1), (3.0, 1.0, 1)]
    assert outcome.epsilon == pytest.approx(gaussian_epsilon(history, delta=DELTA), rel=1e-9)
    assert outcome.epsilon < epsilon(history, delta=DELTA)
    secure = PopularityPlan(server_round=0, dp=True, noise_multiplier=2.0, delta=DELTA, privacy="distributed")
    state = device.charge(secure, device.load_state(), t_min=10, colluders=1)
    assert not state.gaussian_record  # Skellam noise mapped through RDP: exact accounting no longer applies
    assert device.epsilon(DELTA) == pytest.approx(epsilon(state.history, delta=DELTA))


def test_a_state_from_before_the_flag_keeps_rdp():
    payload = DeviceState(device_id="d", history=((1.0, 1.0, 1),)).payload()
    del payload["gaussian_record"]
    import json

    from fedrec.shared.state import _canonical, _digest  # a state file as an earlier fedrec wrote it
    body = _canonical(payload)
    raw = b'{"sha256": "%s", "state": ' % _digest(body, None).encode() + body + b"}"
    assert not DeviceState.from_bytes(raw, source="old").gaussian_record
    json.loads(raw)


def test_the_server_calibrates_local_mode_as_devices_account():
    config = RunConfig(epsilon_budget=8.0, rounds=20, devices_per_round=50)
    sigma = noise_multiplier_for(config, 200)
    prior = popularity_plan(config)
    # exact accounting affords less noise for the same budget than RDP did (RDP's sigma is larger)
    rdp_prior_eps = epsilon([(prior.noise_multiplier, 1.0, 1)], delta=config.delta)
    assert gaussian_epsilon([(prior.noise_multiplier, 1.0, 1)], delta=config.delta) == pytest.approx(4.0, abs=0.01)
    assert rdp_prior_eps > 4.0
    assert sigma > 0

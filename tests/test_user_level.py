"""User-level (central) DP accounting: neighbouring relations, fixed denominator, popularity report, audit."""

from __future__ import annotations

import json
import logging
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant as DpaRdpAccountant
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

from fedrec.server import audit
from fedrec.server.core import ItemModelServer, ServerRandomness, central_denominator
from fedrec.server.user_privacy import central_record, user_level_epsilon, user_level_summary
from fedrec.shared.aggregation import PartialSum
from fedrec.shared.config import RunConfig
from fedrec.shared.model import ItemTables
from tests.helpers import plan

logging.getLogger("absl").setLevel(logging.ERROR)

DELTA = 1e-5
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]  # dp-accounting's


def hand_epsilon(multiplier: float, *, releases: int = 1, delta: float = DELTA) -> float:
    """Gaussian mechanism by hand: RDP alpha / (2 m^2) per release (Mironov 2017), composed by addition, converted
    with eps = rdp + log(1 - 1/alpha) - log(delta alpha) / (alpha - 1) (Canonne, Kamath, Steinke 2020), min over
    the orders - the conversion dp-accounting (and so Flower's accountant) uses."""
    return min(releases * a / (2 * multiplier**2) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
               for a in ORDERS)


def rounds(count: int, *, z: float, clip: float = 1.0, size: int, population: int, sampling: str) -> list[dict]:
    config = RunConfig(central_noise_multiplier=z, delta_clip_norm=clip, devices_per_round=size,
                       device_sampling=sampling)
    return [central_record(config, population=population, contributors=size) for _ in range(count)]


def test_replace_one_needs_half_the_multiplier_7_9_is_really_20():
    # What REPLACE_ONE assumes: with the sample equal to the population, dp-accounting's without-replacement
    # event is the plain Gaussian alpha / (2 m^2) with m the multiplier it is given - so m must be
    # std / (replace-one sensitivity) = z S / 2S = z / 2.
    full = DpaRdpAccountant(orders=ORDERS, neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    full.compose(dp_accounting.SampledWithoutReplacementDpEvent(10, 10, dp_accounting.GaussianDpEvent(1.5)))
    assert full.get_epsilon(DELTA) == pytest.approx(hand_epsilon(1.5), rel=1e-12)

    # The old convention: z = 2 handed to Flower's replace-one accountant, 100 of 500 devices, 50 rounds.
    naive = RdpAccountant(PrivacyConfig(target_delta=DELTA, population_size=500,
                                        neighboring_relation=NeighboringRelation.REPLACE_ONE,
                                        sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))
    naive.compose(GaussianPrivacyEvent(noise_multiplier=2.0, sample_size=100, population_size=500), 50)
    assert naive.get_epsilon(DELTA) == pytest.approx(7.904, abs=1e-3)

    fixed = rounds(50, z=2.0, size=100, population=500, sampling="fixed")
    server = user_level_epsilon(fixed, sampling="fixed", delta=DELTA)
    recomputed = audit.user_level_epsilon(fixed, sampling="fixed", delta=DELTA)
    assert server == pytest.approx(19.965, abs=1e-3) and recomputed == pytest.approx(server, rel=1e-9)


@pytest.mark.parametrize("sampling, sensitivity", [("poisson", 1.0), ("fixed", 2.0)])
def test_one_unamplified_round_is_the_hand_computed_gaussian(sampling, sensitivity):
    # z = 3, S = 0.5, D = 40: the mean gets std z S / D, and moves by at most S / D (add/remove) or
    # 2 S / D (replace-one), so the multiplier is 3 (eps 1.38628 at order 14) or 1.5 (eps 2.98480 at order 7.5).
    z, clip, denominator = 3.0, 0.5, 40
    multiplier = (z * clip / denominator) / (sensitivity * clip / denominator)
    expected = {"poisson": 1.386275, "fixed": 2.984800}[sampling]
    assert hand_epsilon(multiplier) == pytest.approx(expected, abs=1e-6)
    one = rounds(1, z=z, clip=clip, size=denominator, population=100, sampling=sampling)
    assert one[0]["denominator"] == denominator and one[0]["sum_sensitivity"] == sensitivity * clip
    for compute in (user_level_epsilon, audit.user_level_epsilon):
        assert compute(one, sampling=sampling, delta=DELTA, amplified=False) == pytest.approx(expected, abs=1e-6)
    everyone = rounds(1, z=z, clip=clip, size=100, population=100, sampling=sampling)  # rate 1: nothing to amplify
    assert user_level_epsilon(everyone, sampling=sampling, delta=DELTA) == pytest.approx(expected, abs=1e-6)


def test_poisson_sampling_is_add_remove_with_sensitivity_s():
    poisson = rounds(30, z=1.2, size=50, population=1000, sampling="poisson")
    reference = DpaRdpAccountant(orders=ORDERS)  # add/remove; multiplier z itself
    reference.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.2)), 30)
    assert user_level_epsilon(poisson, sampling="poisson", delta=DELTA) == pytest.approx(
        reference.get_epsilon(DELTA), rel=1e-9)
    assert audit.user_level_epsilon(poisson, sampling="poisson", delta=DELTA) == pytest.approx(
        reference.get_epsilon(DELTA), rel=1e-9)


def test_popularity_report_is_a_gaussian_with_sensitivity_sqrt_catalogue():
    # sigma 4 on a 16-item catalogue: the indicator's norm is up to sqrt(16) = 4, multiplier 1: eps 4.72851.
    assert user_level_epsilon([], sampling="poisson", delta=DELTA, popularity=[4.0 / math.sqrt(16)]) == \
        pytest.approx(hand_epsilon(1.0), rel=1e-9)
    assert hand_epsilon(1.0) == pytest.approx(4.728507, abs=1e-6)
    assert audit.user_level_epsilon([], sampling="fixed", delta=DELTA, popularity=[(4.0, 16)]) == \
        pytest.approx(hand_epsilon(1.0), rel=1e-9)
    # composed with an unamplified central round (multiplier 3, add/remove): RDP adds, 1/18 + 1/2 per order
    one = rounds(1, z=3.0, size=10, population=10, sampling="poisson")
    both = hand_epsilon(1 / math.sqrt(1 / 9 + 1))
    assert user_level_epsilon(one, sampling="poisson", delta=DELTA, popularity=[1.0]) == pytest.approx(both, rel=1e-9)
    assert audit.user_level_epsilon(one, sampling="poisson", delta=DELTA, popularity=[(4.0, 16)]) == \
        pytest.approx(both, rel=1e-9)
    assert user_level_epsilon(one, sampling="poisson", delta=DELTA, popularity=[0.0]) == math.inf  # no noise


def run_dir_with(tmp_path, config: RunConfig, entries: list[dict], claimed: float | None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config.to_mapping()))
    if claimed is not None:
        (tmp_path / "summary.json").write_text(json.dumps({"privacy": {"user_level": {"epsilon": claimed}}}))
    return tmp_path


def test_summary_includes_the_popularity_report_and_the_audit_agrees(tmp_path):
    config = RunConfig(central_noise_multiplier=2.0, delta_clip_norm=1.0, devices_per_round=100,
                       device_sampling="fixed", devices=500)
    plan_ = {"dp": True, "noise-multiplier": 30.0}
    popularity = [{"round": 0, "kind": "popularity", "status": "sent", "attempt": 0, "plan": plan_},  # write-ahead
                  {"round": 0, "kind": "popularity", "status": "done", "attempt": 0, "plan": plan_,
                   "central": {"num_items": 400}}]  # the same attempt's outcome: one report, counted once
    ledger = popularity + [{"round": r, "kind": "train", "central": c}
                             for r, c in enumerate(rounds(50, z=2.0, size=100, population=500, sampling="fixed"), 1)]
    summary = user_level_summary(config, ledger, randomness=ServerRandomness.seeded(config.seed))
    assert summary["epsilon_training_rounds"] == pytest.approx(19.965, abs=1e-3)
    assert summary["epsilon_popularity_reports"] == pytest.approx(hand_epsilon(30.0 / 20.0), rel=1e-9)
    assert summary["epsilon_training_rounds"] < summary["epsilon"] < summary["epsilon_without_amplification"]
    assert len(summary["includes"]) == 2 and summary["popularity_sensitivity"] == 20.0
    assert summary["effective_noise_multiplier"] == 1.0 and summary["sum_sensitivity"] == 2.0
    assert summary["mean_denominator"] == 100 and "not secret" in summary["randomness"]

    honest = run_dir_with(tmp_path / "honest", config, ledger, summary["epsilon"])
    result, flags = audit.audit_user_level(ledger, config, honest, 1e-3)
    assert flags == [] and result["epsilon_recomputed"] == pytest.approx(summary["epsilon"], rel=1e-6)
    # the old convention's claim (z handed to replace-one, popularity left out) is caught
    old = run_dir_with(tmp_path / "old", config, ledger, 7.904)
    _, flags = audit.audit_user_level(ledger, config, old, 1e-3)
    assert [f.code for f in flags] == ["user_level_under_reported"]


def test_audit_flags_a_data_dependent_denominator(tmp_path):
    config = RunConfig(central_noise_multiplier=1.0, delta_clip_norm=1.0, devices_per_round=10,
                       device_sampling="poisson", devices=50)
    records = rounds(2, z=1.0, size=10, population=50, sampling="poisson")
    records[0]["denominator"] = 7  # the realised count
    del records[1]["denominator"]  # a ledger from before the fixed denominator
    ledger = [{"round": r, "kind": "train", "central": c} for r, c in enumerate(records, 1)]
    _, flags = audit.audit_user_level(ledger, config, run_dir_with(tmp_path, config, ledger, None), 1e-3)
    assert [(f.code, f.severity) for f in flags] == [("central_denominator_not_fixed", "error"),
                                                     ("central_denominator_unrecorded", "warning")]


def test_central_mean_divides_by_the_planned_count_not_the_realised_one():
    config = RunConfig(central_noise_multiplier=0.5, delta_clip_norm=1.0, devices_per_round=8, server_lr=1.0)
    tables = ItemTables(embedding=np.zeros((5, 2), np.float32), bias=np.zeros(5, np.float32))
    total = PartialSum.zeros(5, 2)
    for k in range(3):  # 3 of the planned 8 trained
        total.add((np.full((5, 2), 0.1 * (k + 1), np.float32), np.zeros(5, np.float32)), clip=1.0)
    randomness = ServerRandomness.seeded(3)
    server = ItemModelServer(config, tables)
    server.apply(total, plan(dp=False, noise_multiplier=0.0), rng=randomness.for_round(1, 0, 9), population=20)
    noise = randomness.for_round(1, 0, 9)
    expected = (total.embedding + noise.normal(0.0, 0.5, (5, 2))) / central_denominator(config, 20)
    np.testing.assert_allclose(server.tables.embedding, expected, rtol=1e-5)
    assert central_denominator(config, 20) == 8 and central_denominator(config, 5) == 5
    assert server.noise_variance == pytest.approx((0.5 / 8) ** 2)

    nobody = ItemModelServer(config, tables)  # nobody trained: the noise is still released
    nobody.apply(PartialSum.zeros(5, 2), plan(dp=False, noise_multiplier=0.0), rng=randomness.for_round(2, 0, 9),
                 population=20)
    assert np.any(nobody.tables.embedding != 0)

    plain = ItemModelServer(config.replace(central_noise_multiplier=0.0), tables)  # non-private: uniform mean
    plain.apply(total, plan(dp=False, noise_multiplier=0.0), rng=randomness.for_round(3, 0, 9), population=20)
    np.testing.assert_allclose(plain.tables.embedding, total.embedding / 3, rtol=1e-6)

"""Distributed DP: the Skellam bound against the exact divergence, the grid, the noise shares and their sum."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedrec.shared.distributed_dp import (
    GRID_INFLATION,
    SumMechanism,
    accounted_multiplier,
    distributed_entries,
    skellam_rdp,
    to_modular,
)
from fedrec.shared.privacy.accounting import RDP_ORDERS, rdp_curve
from scipy.stats import skellam


def exact_skellam_divergence(alpha: float, variance: float, shift: int) -> float:
    """D_alpha(Sk + shift || Sk) for Sk of the given variance, summed over the support (log-space)."""
    mu = variance / 2
    width = int(40 * math.sqrt(variance)) + 40 * shift + 100
    support = np.arange(-width, width + 1)
    log_p = skellam.logpmf(support - shift, mu, mu)
    log_q = skellam.logpmf(support, mu, mu)
    finite = np.isfinite(log_p) & np.isfinite(log_q)  # the far tails underflow; their mass is negligible
    terms = alpha * log_p[finite] + (1 - alpha) * log_q[finite]
    top = terms.max()
    return float((top + math.log(np.exp(terms - top).sum())) / (alpha - 1))


@pytest.mark.parametrize("variance", [4.0, 20.0, 200.0])
@pytest.mark.parametrize("shift", [1, 2, 5])
@pytest.mark.parametrize("alpha", [1.5, 2.0, 8.0, 32.0])
def test_the_skellam_bound_is_above_the_exact_divergence(variance, shift, alpha):
    exact = exact_skellam_divergence(alpha, variance, shift)
    bound = float(skellam_rdp(np.array([alpha]), variance=variance, l2=shift, l1=shift)[0])
    assert exact <= bound * (1 + 1e-9)
    gaussian = alpha * shift**2 / (2 * variance)
    assert bound < gaussian * 1.5 + 3 * shift / (2 * variance)  # and not vacuous: close to the Gaussian curve


def test_the_accounted_multiplier_bounds_the_skellam_curve_on_the_grid():
    for z, shares, dim in [(1.0, 1.0, 1), (0.8, 1.0, 170_000), (1.0, 1 / 80, 1), (3.0, 1 / 100, 40)]:
        mech = SumMechanism(sensitivity=0.7, noise_multiplier=z, t_min=1, dimension=dim)
        variance = shares * (z * mech.sensitivity / mech.grid_step) ** 2
        l2 = mech.sensitivity / mech.grid_step + math.sqrt(dim)
        exact_bound = skellam_rdp(np.asarray(RDP_ORDERS), variance=variance, l2=l2, l1=math.sqrt(dim) * l2)
        accounted = rdp_curve([(accounted_multiplier(z, shares), 1.0, 1)])
        assert np.all(accounted >= exact_bound * (1 - 1e-12))
        # the loss against an exact Gaussian at z (shares of it): the rounding inflation (1%), plus the Skellam
        # correction at small variances (under 1% here)
        assert accounted_multiplier(z, shares) == pytest.approx(z * math.sqrt(shares) / (1 + GRID_INFLATION),
                                                                rel=1e-2)


def test_distributed_entries_give_three_figures_by_threat():
    honest, malicious, own = distributed_entries(1.0, 80)  # c = 0: the malicious figure is the honest one
    assert honest[0] == pytest.approx(malicious[0]) == pytest.approx(1 / 1.01, rel=1e-3)
    assert own[0] == pytest.approx(1 / 1.01 / math.sqrt(80), rel=1e-2)
    assert distributed_entries(1.0, 80, sensitivity_factor=2.0)[0][0] == pytest.approx(honest[0] / 2)
    # c = 8 colluders: each share is 1/72 of the variance, so t - c honest shares carry the full noise (the
    # headline), all 80 carry 80/72 of it (honest), one share 1/72 (own share)
    honest, malicious, own = distributed_entries(1.0, 80, 8)
    assert malicious[0] == pytest.approx(1 / 1.01, rel=1e-3)
    assert honest[0] == pytest.approx(math.sqrt(80 / 72) / 1.01, rel=1e-3)
    assert own[0] == pytest.approx(1 / 1.01 / math.sqrt(72), rel=1e-2)
    assert honest[0] > malicious[0] > own[0]
    for t, c in ((0, 0), (5, 5), (5, -1)):
        with pytest.raises(ValueError):
            distributed_entries(1.0, t, c)


def test_a_share_makes_t_minus_c_shares_carry_the_full_noise():
    mech = SumMechanism(sensitivity=1.0, noise_multiplier=2.0, t_min=10, dimension=50, colluders=3)
    assert 7 * mech.share_variance == pytest.approx((2.0 * 1.0 / mech.grid_step) ** 2)
    assert mech.sum_noise_std(7) == pytest.approx(2.0, rel=1e-12)
    with pytest.raises(ValueError):
        SumMechanism(sensitivity=1.0, noise_multiplier=2.0, t_min=3, dimension=50, colluders=3)


def test_quantised_sum_decodes_within_the_rounding_bound_and_wraps_modulo_2_64():
    rng = np.random.default_rng(0)
    mech = SumMechanism(sensitivity=1.0, noise_multiplier=0.0, t_min=5, dimension=300)
    vectors = [rng.normal(0, 0.05, 300) for _ in range(5)]
    encoded = [mech.encode(v, rng)[0] for v in vectors]
    modular = np.zeros(300, dtype=np.uint64)
    for e in encoded:
        modular += to_modular(e)  # wraps for negative values
    total = mech.decode(modular)
    assert np.max(np.abs(total - np.sum(vectors, axis=0))) <= 5 * mech.grid_step / 2 + 1e-12
    assert mech.encode(None, rng)[0].tolist() == [0] * 300


def test_noise_shares_sum_to_the_full_variance_and_the_clamp_never_cuts_them():
    rng = np.random.default_rng(1)
    mech = SumMechanism(sensitivity=0.5, noise_multiplier=1.0, t_min=20, dimension=20_000)
    grids, clamped = zip(*(mech.encode(np.zeros(20_000), rng) for _ in range(20)))
    total = np.sum(grids, axis=0)
    assert sum(clamped) == 0
    std = float(np.std(mech.decode(total)))
    assert std == pytest.approx(1.0 * 0.5, rel=0.02)  # t_min shares: z * sensitivity
    assert mech.sum_noise_std(20) == pytest.approx(0.5, rel=1e-9)
    # a clamp rate check at a large noise: one device's share at z = 50 stays far inside the clamp
    loud = SumMechanism(sensitivity=1.0, noise_multiplier=50.0, t_min=2, dimension=170_000)
    assert loud.encode(np.zeros(170_000), rng)[1] == 0


def test_one_node_level_draw_matches_per_device_draws_in_distribution():
    """The cohort engine draws a node's m shares at once; the device engine draws each: same distribution."""
    from scipy.stats import ks_2samp

    mech = SumMechanism(sensitivity=1.0, noise_multiplier=1.0, t_min=10, dimension=5_000)
    rng = np.random.default_rng(2)
    once = mech.noise(rng, shares=7)
    each = np.sum([mech.noise(rng) for _ in range(7)], axis=0)
    assert ks_2samp(once, each).pvalue > 1e-3
    assert np.var(once) == pytest.approx(7 * mech.share_variance, rel=0.05)


def test_an_evaluation_release_is_also_user_level_and_a_popularity_report_is_not():
    from fedrec.shared.eval_release import EvaluationPlan
    from fedrec.shared.popularity import PopularityPlan
    from fedrec.shared.privacy.releases import release_cost

    evaluation = EvaluationPlan(server_round=1, dp=True, noise_multiplier=5.0, delta=1e-5, refit_l2=1.0)
    assert release_cost(evaluation).user == [(5.0, 1.0, 1)]
    report = PopularityPlan(server_round=0, dp=True, noise_multiplier=2.0, delta=1e-5)
    assert release_cost(report).user is None  # sensitivity 1 per (device, item), not per device
    user_report = PopularityPlan(server_round=0, dp=True, noise_multiplier=2.0, delta=1e-5, privacy="user")
    cost = release_cost(user_report, t_min=10, colluders=1)
    assert cost.user is not None and cost.user_honest[0][0] > cost.user[0][0] > cost.user_subverted[0][0]
    assert cost.record[0][0] == pytest.approx(cost.user[0][0] / 2)


def test_poisson_draws_above_the_exact_rate_keep_uniform_low_bits():
    """numpy draws Poisson in double precision: at 2^55 every draw is a multiple of 4 or 8, so a noised value's
    low bits would be the exact quantised value. exact_poisson sums exact draws instead."""
    from fedrec.shared.distributed_dp import exact_poisson
    from scipy.stats import chisquare

    rng = np.random.default_rng(7)
    assert np.all(rng.poisson(2.0**55, 256) % 4 == 0)  # the failure mode this guards against
    draws = exact_poisson(rng, 2.0**55, 512)
    assert chisquare(np.bincount(draws % 8, minlength=8)).pvalue > 1e-4
    assert abs(draws.mean() - 2.0**55) < 6 * np.sqrt(2.0**55 / 512)


def test_a_share_rate_beyond_exact_sampling_is_a_plan_error_and_honest_large_runs_pass():
    from fedrec.shared.distributed_dp import MAX_SHARE_RATE
    from fedrec.shared.plans import PlanError

    SumMechanism(sensitivity=0.5, noise_multiplier=50.0, t_min=2, dimension=10**7)  # a large honest run
    with pytest.raises(PlanError, match="draws exactly"):
        SumMechanism(sensitivity=0.5, noise_multiplier=2e5, t_min=3, dimension=3000)
    big = SumMechanism(sensitivity=1.0, noise_multiplier=50.0, t_min=2, dimension=10**7)
    assert big.share_variance / 2 <= MAX_SHARE_RATE

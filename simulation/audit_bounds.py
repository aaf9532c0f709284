"""Empirical privacy figures from an attack's guesses: the one-run lower bound and the one-shot Gaussian estimate.

One-run lower bound (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training run", Thm. 3.3 and
their Appendix D): m canaries, each inserted independently with probability 1/2; the attacker guesses for r of
them and is right v times. Under (epsilon, delta)-DP with respect to each canary,
    P[correct >= v] <= P[Bin(r, p) >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= Bin(r, p) < v] / i,
with p = e^eps / (1 + e^eps). The largest epsilon whose p-value is below 1 - confidence is a lower bound on the
true epsilon: the true epsilon is at least this (0: the attack found no evidence). With r guesses the bound cannot
exceed what v = r gives (max_bound): a bound far below the accountant's figure can mean too few guesses.

One-shot estimate (Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, ICLR 2024, "One-shot empirical privacy
estimation for federated learning"): canary clients send fixed random directions; the cosines of the final update
with the inserted canaries' directions are fitted by a Gaussian N(mu, s^2) and compared with the null N(0, 1/d)
of a random direction; the epsilon at delta between the two Gaussians is the estimate. Not a bound: it assumes
the cosines are Gaussian, and it says what this attacker achieves, not what every attacker could.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom, norm

CONFIDENCE = 0.95
EPS_CEILING = 50.0  # bisection range of the bounds


def one_run_p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P-value of `correct` of `guesses` right among `canaries` under the null '(epsilon, delta)-DP'."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries ({canaries})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"epsilon {epsilon} must be >= 0 and delta {delta} in [0, 1]")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(correct - 1, guesses, p))  # P[Bin >= correct]
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    below = binom.pmf(correct - np.arange(1, correct + 1), guesses, p)  # P[Bin = v - i], i = 1..v
    alpha = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(tail + 2 * canaries * delta * alpha, 1.0)


def one_run_lower_bound(*, canaries: int, guesses: int, correct: int, delta: float,
                        confidence: float = CONFIDENCE) -> float:
    """The largest epsilon that `correct` of `guesses` right rejects at `confidence` (0: no evidence)."""
    if guesses == 0:
        return 0.0
    level = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta) < level

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, EPS_CEILING
    if rejected(hi):
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def one_run_max_bound(*, canaries: int, guesses: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest bound `guesses` guesses could ever show: every guess right."""
    return one_run_lower_bound(canaries=canaries, guesses=guesses, correct=guesses, delta=delta,
                               confidence=confidence)


def guess_from_scores(scores: np.ndarray, present: np.ndarray, *, per_side: int) -> tuple[int, int]:
    """(guesses, correct): 'present' for the `per_side` highest scores, 'absent' for the `per_side` lowest."""
    scores, present = np.asarray(scores, dtype=np.float64), np.asarray(present, dtype=bool)
    per_side = max(0, min(per_side, len(scores) // 2))
    order = np.argsort(scores, kind="stable")
    guessed_in, guessed_out = order[len(order) - per_side:], order[:per_side]
    return 2 * per_side, int(present[guessed_in].sum() + (~present[guessed_out]).sum())


def gaussian_pair_epsilon(*, null_mean: float, null_std: float, mean: float, std: float, delta: float) -> float:
    """Epsilon at `delta` between N(null_mean, null_std^2) and N(mean, std^2), both orders (hockey-stick, numeric)."""
    if null_std <= 0 or std <= 0 or not 0 < delta < 1:
        raise ValueError(f"stds {null_std}, {std} must be > 0 and delta {delta} in (0, 1)")
    lo_x = min(null_mean - 40 * null_std, mean - 40 * std)
    hi_x = max(null_mean + 40 * null_std, mean + 40 * std)
    x = np.linspace(lo_x, hi_x, 400_001)
    dx = x[1] - x[0]
    p, q = norm.pdf(x, mean, std), norm.pdf(x, null_mean, null_std)

    def delta_at(eps: float) -> float:
        scale = math.exp(eps)
        return max(float(np.sum(np.clip(a - scale * b, 0.0, None)) * dx) for a, b in ((p, q), (q, p)))

    if delta_at(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, EPS_CEILING
    if delta_at(hi) > delta:
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


def one_shot_estimate(cosines: np.ndarray, *, dimension: int, delta: float) -> float:
    """Andrew et al.'s estimate from the inserted canaries' cosines with the final update in `dimension` dims."""
    cosines = np.asarray(cosines, dtype=np.float64)
    if cosines.size < 2:
        return 0.0
    return gaussian_pair_epsilon(null_mean=0.0, null_std=1.0 / math.sqrt(dimension), mean=float(cosines.mean()),
                                 std=max(float(cosines.std(ddof=1)), 1e-12), delta=delta)


def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Epsilon at `delta` of the Gaussian mechanism with sensitivity / std = `mu` (Balle & Wang 2018, exact)."""
    def delta_at(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))

    if delta_at(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, EPS_CEILING
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi

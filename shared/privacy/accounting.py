"""Record-level privacy accounting: RDP of the subsampled Gaussian, composed over a device's history (and the
exact figure of a composition of plain Gaussian mechanisms, where a history is one).

A device's history is Opacus's accountant history, ``[(noise_multiplier, sample_rate,
steps), ...]``. RDP composes additively, so the curve of one step of each (sigma, q) is
computed once and scaled by the step count; epsilon is the RDP-to-(epsilon, delta) conversion
of Balle et al. 2020, Thm. 21. With q = 1 (every example in every step: the default, and the
popularity report and evaluation releases) one step is the Gaussian mechanism, whose RDP at
order a is a / (2 sigma^2) (Mironov 2017, Prop. 7): computed here without Opacus, so that a
device checks its budget for the messages that do not train without importing torch. With
q < 1 the subsampled curve (Mironov et al. 2019) comes from Opacus, imported then. The same
numbers come out of ``opacus.accountants.RDPAccountant.get_epsilon`` (tests/test_accounting.py
and tests/test_import_cost.py pin the equality); this path is only faster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

HistoryEntry = tuple[float, float, int]
# opacus.accountants.RDPAccountant.DEFAULT_ALPHAS
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def normalize_history(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Validate a stored history; raises ValueError naming the bad entry."""
    out: list[HistoryEntry] = []
    for n, entry in enumerate(history):
        if len(entry) != 3:
            raise ValueError(f"privacy history entry {n}: expected (noise_multiplier, sample_rate, steps), got {entry!r}")
        sigma, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
        if not (sigma > 0 and 0 < q <= 1 and steps >= 0 and math.isfinite(sigma)):
            raise ValueError(f"privacy history entry {n}: sigma={sigma}, q={q}, steps={steps} is not a valid step")
        out.append((sigma, q, steps))
    return out


def compact_history(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Merge entries with the same (sigma, q), keeping first-seen order: RDP composition is order-free."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        steps[(float(sigma), float(q))] = steps.get((float(sigma), float(q)), 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in steps.items() if n > 0]


@lru_cache(maxsize=1024)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    orders = np.asarray(RDP_ORDERS, dtype=np.float64)
    if sample_rate <= 0:
        curve = np.zeros_like(orders)
    elif noise_multiplier <= 0:
        curve = np.full_like(orders, np.inf)
    elif sample_rate >= 1.0:
        curve = orders / (2.0 * noise_multiplier**2)  # the Gaussian mechanism, sensitivity 1
    else:
        from .. import opacus_lean  # noqa: F401 - defers opacus's package __init__ (see there)
        from opacus.accountants.analysis import rdp as subsampled  # only for q < 1

        curve = np.asarray(subsampled.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                                  orders=list(RDP_ORDERS)), dtype=np.float64)
    curve.setflags(write=False)
    return curve


def rdp_curve(history: Iterable[HistoryEntry]) -> np.ndarray:
    total = np.zeros(len(RDP_ORDERS))
    for sigma, q, steps in history:
        total = total + steps * _rdp_one_step(float(sigma), float(q))
    return total


def epsilon(history: Iterable[HistoryEntry], *, delta: float, exact_gaussian: bool = False) -> float:
    """Cumulative epsilon of everything a device released, at the given delta (0.0 for no steps).

    `exact_gaussian`: every entry is a Gaussian mechanism of L2 sensitivity 1 at its listed multiplier (local
    mode: no Skellam noise mapped to a Gaussian through RDP). Where every step also has q = 1, the exact figure of
    that composition (gaussian_epsilon) is used when it is lower: both are upper bounds, RDP's is looser.
    """
    history = list(history)
    curve = rdp_curve(history)
    if not curve.any():
        return 0.0
    rdp = epsilon_from_rdp(curve, delta=delta)
    exact = gaussian_epsilon(history, delta=delta) if exact_gaussian else None
    return rdp if exact is None else min(rdp, exact)


# The exact figure is solved to within this (relative, plus EXACT_SLACK absolute) and then rounded up by it, so
# floating-point error in the two terms of delta(epsilon) can only make the stated epsilon larger.
EXACT_SLACK = 1e-9


def gaussian_delta(eps: float, mu: float) -> float:
    """delta(epsilon) of mu-GDP, the exact privacy profile of a Gaussian mechanism with sensitivity / sigma = mu
    (Balle & Wang 2018, Thm. 8; Dong, Roth & Su 2022, Cor. 2.13): Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    first = 0.5 * math.erfc((eps / mu - mu / 2) / math.sqrt(2))
    tail = 0.5 * math.erfc((eps / mu + mu / 2) / math.sqrt(2))
    second = math.exp(eps + math.log(tail)) if tail > 0 else 0.0
    return max(0.0, first - second)


def gaussian_epsilon(history: Iterable[HistoryEntry], *, delta: float) -> float | None:
    """Exact epsilon of a composition of Gaussian mechanisms at q = 1 (None where any step is subsampled).

    n releases at multipliers sigma_i compose exactly to one Gaussian mechanism with mu = sqrt(sum n_i / sigma_i^2)
    (Dong, Roth & Su 2022, Cor. 3.3, adaptive composition), whose (epsilon, delta) curve is gaussian_delta: the
    epsilon is its root, found by bisection and rounded up (EXACT_SLACK). It is the figure a PLD accountant
    approaches from above as its discretisation is refined.
    """
    inverse = 0.0
    for sigma, q, steps in history:
        if steps == 0:
            continue
        if q < 1.0:
            return None
        if not (sigma > 0 and math.isfinite(sigma)):
            return math.inf
        inverse += steps / sigma**2
    if inverse == 0.0:
        return 0.0
    mu = math.sqrt(inverse)
    target = delta * (1 - EXACT_SLACK)
    if gaussian_delta(0.0, mu) <= target:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, mu) > target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return None  # beyond any budget: leave it to RDP
    for _ in range(200):
        mid = (lo + hi) / 2
        if gaussian_delta(mid, mu) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= EXACT_SLACK * max(1.0, hi):
            break
    return hi * (1 + EXACT_SLACK) + EXACT_SLACK


def epsilon_from_rdp(curve: np.ndarray, *, delta: float) -> float:
    """Balle et al. 2020, Thm. 21: epsilon = min over orders a of rdp(a) + log((a-1)/a) - (log delta + log a)/(a-1)."""
    orders = np.asarray(RDP_ORDERS, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # an infinite curve (no noise) gives inf, never a number
        candidates = curve + np.log((orders - 1) / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    candidates = candidates[~np.isnan(candidates)]
    return float(candidates.min()) if candidates.size else math.inf


def epsilon_after(history: Sequence[HistoryEntry], round_steps: Sequence[HistoryEntry], *, delta: float,
                  exact_gaussian: bool = False) -> float:
    """Epsilon the device would have after a round's steps: checked before any data is touched."""
    return epsilon(compact_history([*history, *round_steps]), delta=delta, exact_gaussian=exact_gaussian)


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               tolerance: float = 1e-3, user_steps: int = 0, user_noise_ratio: float = 1.0,
                               fixed_history: Sequence[HistoryEntry] = (), exact_gaussian: bool = False) -> float:
    """Smallest sigma (to `tolerance`) at which `steps` steps at sigma (plus `user_steps` steps at
    user_noise_ratio * sigma), all at rate q, after `fixed_history`, stay within target_epsilon (accounted as a
    device accounts them: `exact_gaussian` in local mode, see epsilon)."""
    if epsilon(fixed_history, delta=delta, exact_gaussian=exact_gaussian) >= target_epsilon:
        raise ValueError(f"the fixed steps {list(fixed_history)} alone exceed epsilon {target_epsilon}")

    def eps(sigma: float) -> float:
        history = [*fixed_history, (sigma, sample_rate, steps)]
        if user_steps:
            history.append((user_noise_ratio * sigma, sample_rate, user_steps))
        return epsilon(compact_history(history), delta=delta, exact_gaussian=exact_gaussian)

    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ValueError(f"cannot reach epsilon {target_epsilon} with {steps} steps at q={sample_rate}")
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi

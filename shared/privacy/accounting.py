"""Record-level privacy accounting: RDP of the subsampled Gaussian, composed over a device's history.

A device's history is Opacus's accountant history, ``[(noise_multiplier, sample_rate,
steps), ...]``. RDP composes additively, so the curve of one step of each (sigma, q) is
computed once (Mironov et al. 2019, via Opacus) and scaled by the step count; epsilon is
Opacus's RDP-to-(epsilon, delta) conversion (Balle et al. 2020, Thm. 21). The same numbers
come out of ``opacus.accountants.RDPAccountant.get_epsilon``; this path is only faster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

HistoryEntry = tuple[float, float, int]
RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)


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
    curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS)
    curve = np.asarray(curve, dtype=np.float64)
    curve.setflags(write=False)
    return curve


def rdp_curve(history: Iterable[HistoryEntry]) -> np.ndarray:
    total = np.zeros(len(RDP_ORDERS))
    for sigma, q, steps in history:
        total = total + steps * _rdp_one_step(float(sigma), float(q))
    return total


def epsilon(history: Iterable[HistoryEntry], *, delta: float) -> float:
    """Cumulative epsilon of everything a device released, at the given delta (0.0 for no steps)."""
    curve = rdp_curve(history)
    if not curve.any():
        return 0.0
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=curve, delta=delta)
    return float(eps)


def epsilon_after(history: Sequence[HistoryEntry], round_steps: Sequence[HistoryEntry], *, delta: float) -> float:
    """Epsilon the device would have after a round's steps: checked before any data is touched."""
    return epsilon(compact_history([*history, *round_steps]), delta=delta)


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               tolerance: float = 1e-3, user_steps: int = 0, user_noise_ratio: float = 1.0,
                               fixed_history: Sequence[HistoryEntry] = ()) -> float:
    """Smallest sigma (to `tolerance`) at which `steps` steps at sigma (plus `user_steps` steps at
    user_noise_ratio * sigma), all at rate q, after `fixed_history`, stay within target_epsilon."""
    if epsilon(fixed_history, delta=delta) >= target_epsilon:
        raise ValueError(f"the fixed steps {list(fixed_history)} alone exceed epsilon {target_epsilon}")

    def eps(sigma: float) -> float:
        history = [*fixed_history, (sigma, sample_rate, steps)]
        if user_steps:
            history.append((user_noise_ratio * sigma, sample_rate, user_steps))
        return epsilon(compact_history(history), delta=delta)

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

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


def append_steps(history: Sequence[HistoryEntry], *, noise_multiplier: float, sample_rate: float,
                 steps: int) -> list[HistoryEntry]:
    """History after `steps` more steps at (sigma, q), merged like Opacus's RDPAccountant.step."""
    out = list(history)
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (noise_multiplier, sample_rate, out[-1][2] + steps)
    else:
        out.append((noise_multiplier, sample_rate, steps))
    return out


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


def epsilon_after(history: Sequence[HistoryEntry], *, noise_multiplier: float, sample_rate: float, steps: int,
                  delta: float) -> float:
    """Epsilon the device would have after `steps` more steps: checked before any data is touched."""
    return epsilon(append_steps(history, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps),
                   delta=delta)


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               tolerance: float = 1e-3) -> float:
    """Smallest sigma (to `tolerance`) whose `steps` steps at rate q stay within target_epsilon."""
    lo, hi = 0.05, 1.0
    while epsilon([(hi, sample_rate, steps)], delta=delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ValueError(f"cannot reach epsilon {target_epsilon} with {steps} steps at q={sample_rate}")
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if epsilon([(mid, sample_rate, steps)], delta=delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi

"""Distributed DP for secure sums: a device's quantised update plus its share of Skellam noise, and its accounting.

A device in a distributed mode sends (masked, see shared/secagg.py) an integer vector on a grid of
step gamma: its clipped update rounded to the grid, plus Skellam noise of variance V / t_min per
coordinate, where V = (z * sensitivity / gamma)^2. The Skellam distribution (difference of two
Poisson variables) is closed under sums, so any sum the server can decrypt, which holds at least
t_min devices' shares, carries Skellam noise of variance at least V: the whole mechanism is the
Skellam mechanism of Agarwal, Kairouz and Liu (2021) on the quantised sum, and more shares only add
independent noise (post-processing). Rounding moves a vector by at most sqrt(d)/2 grid steps, so the
sensitivity on the grid is sensitivity / gamma + sqrt(d) (both neighbours round); gamma is chosen so
this inflation is GRID_INFLATION of the sensitivity. Against a server that subverts aggregation and
reads one device's vector, only that device's own share protects it: the second figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .plans import PlanError
from .privacy.accounting import RDP_ORDERS, HistoryEntry

GRID_INFLATION = 0.01  # rounding adds at most 1% to the L2 sensitivity
CLAMP = 2**40  # per-coordinate bound on a device's grid value: 2^20 devices still sum inside int64
MODULUS_BITS = 64  # the secure sum is taken modulo 2^64 (numpy uint64 wraps)
# numpy draws Poisson(lam) in double precision: near 2^40 doubles are 2^-12 apart, so every integer outcome is
# reachable; near 2^53 and above the draws come out as multiples of 2, 4, ..., and the low bits of a noised
# value would be the device's exact quantised value. Larger rates are drawn as sums of exact draws (a sum of
# Poissons is Poisson), and a plan asking a device for more than MAX_SHARE_RATE per coordinate is refused:
# no honest run needs it (z = 50 with 10^7 coordinates and t = 2 is 6e13), and it bounds the work of a share.
EXACT_POISSON_RATE = 2.0**40
MAX_SHARE_RATE = 2.0**46


def skellam_rdp(orders: np.ndarray, *, variance: float, l2: float, l1: float) -> np.ndarray:
    """RDP of the multi-dimensional Skellam mechanism (variance per coordinate, L2 and L1 sensitivity on the grid).

    Agarwal, Kairouz and Liu 2021 (Thm. 3.5), written with the variance V = 2 mu of Sk(mu, mu) and with
    2a in place of 2a - 1 (looser, so safe): a l2^2 / (2V) + min((2a l2^2 + 6 l1) / (4 V^2), 3 l1 / (2V)).
    tests/test_distributed_dp.py checks it against the exact Renyi divergence computed from the pmf.
    """
    orders = np.asarray(orders, dtype=np.float64)
    correction = np.minimum((2 * orders * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))
    return orders * l2**2 / (2 * variance) + correction


def accounted_multiplier(noise_multiplier: float, shares: float) -> float:
    """The Gaussian noise multiplier whose RDP curve bounds the quantised Skellam sum's, at every order >= 1.

    `noise_multiplier` z: the std of the full sum's noise over the real-valued sensitivity; `shares`: the
    fraction of the full noise variance present (1 for >= t_min shares, 1 / t_min for one device's own).
    On the grid V = shares (z Delta / gamma)^2, l2 = Delta / gamma + sqrt(d) = sqrt(d) (1 / g + 1) with
    g = GRID_INFLATION, l1 <= sqrt(d) l2. The Skellam curve is at most a l2^2 / (2V) (1 + kappa) with
    kappa = 1 / V + 3 l1 / (V l2^2) (each correction term over the main term, for a >= 1); the worst case
    is the smallest dimension, d = 1, so the bound below holds for every catalogue size.
    """
    if noise_multiplier <= 0 or shares <= 0:
        return 0.0
    l2 = 1.0 / GRID_INFLATION + 1.0  # d = 1
    variance = shares * (noise_multiplier / GRID_INFLATION) ** 2
    kappa = 1.0 / variance + 3.0 * l2 / (variance * l2**2)
    return math.sqrt(variance) / l2 / math.sqrt(1.0 + kappa)


def distributed_entries(noise_multiplier: float, t_min: int, colluders: int = 0, *, steps: int = 1,
                        sensitivity_factor: float = 1.0) -> tuple[HistoryEntry, HistoryEntry, HistoryEntry]:
    """(honest-but-curious, malicious with c colluders, own share) history entries of `steps` releases into a
    secure sum of at least `t_min` shares, each share 1 / (t_min - c) of the full noise variance.

    - honest: the server follows the protocol, so a decrypted sum holds t_min honest shares: t / (t - c);
    - malicious (the headline): the server deviates arbitrarily and colludes with at most c devices, who can
      subtract their own shares, but it cannot enrol identities: at least t - c honest shares, the full noise;
    - own share: enrolment subverted too (Sybils): only the device's own share, 1 / (t - c).
    `sensitivity_factor` > 1 accounts a coarser neighbouring relation with the same noise (e.g. 2 for a
    record changed inside a device whose whole update is clipped to S: the update moves by up to 2S).
    """
    if t_min < 1 or not 0 <= colluders < t_min:
        raise ValueError(f"t_min={t_min}, colluders={colluders}: a sum needs 0 <= c < t_min")
    honest_shares = t_min - colluders
    return tuple((accounted_multiplier(noise_multiplier, shares) / sensitivity_factor, 1.0, steps)  # type: ignore
                 for shares in (t_min / honest_shares, 1.0, 1.0 / honest_shares))


@dataclass(frozen=True)
class SumMechanism:
    """What one device adds to a secure sum: a clipped vector on the grid plus its Skellam noise share."""

    sensitivity: float  # L2 bound of what one neighbouring change moves the vector by, in real units
    noise_multiplier: float  # z: the noise of a sum holding t_min - colluders honest shares has std z * sensitivity
    t_min: int  # fewest shares in any sum the server can decrypt
    dimension: int  # coordinates of the vector
    colluders: int = 0  # c: devices assumed to collude with the server (their shares may be subtracted)

    def __post_init__(self) -> None:
        if not (self.sensitivity > 0 and math.isfinite(self.sensitivity) and self.noise_multiplier >= 0
                and math.isfinite(self.noise_multiplier) and self.t_min >= 1 and self.dimension >= 1
                and 0 <= self.colluders < self.t_min):
            raise ValueError(f"sum mechanism out of range: {self}")
        if self.share_variance / 2.0 > MAX_SHARE_RATE:
            raise PlanError(f"noise multiplier {self.noise_multiplier}: a share's Skellam rate "
                            f"{self.share_variance / 2.0:.3g} per coordinate is above {MAX_SHARE_RATE:.3g}, beyond "
                            "what the device draws exactly")

    @property
    def grid_step(self) -> float:
        return GRID_INFLATION * self.sensitivity / math.sqrt(self.dimension)

    @property
    def share_variance(self) -> float:
        """Skellam variance per coordinate, in grid units, of one device's share: t - c of them carry the full
        noise, so a sum that c colluders strip of their own shares still does."""
        return (self.noise_multiplier * self.sensitivity / self.grid_step) ** 2 / (self.t_min - self.colluders)

    def quantise(self, vector: np.ndarray) -> tuple[np.ndarray, int]:
        """The vector rounded to the grid and clamped (int64), and how many coordinates the clamp cut."""
        scaled = np.rint(np.asarray(vector, dtype=np.float64).ravel() / self.grid_step)
        clamped = int(np.count_nonzero(np.abs(scaled) > CLAMP))
        return np.clip(scaled, -CLAMP, CLAMP).astype(np.int64), clamped

    def noise(self, rng: np.random.Generator, shares: int = 1) -> np.ndarray:
        """`shares` devices' Skellam noise at once (a sum of Skellams is Skellam: one draw is exact)."""
        lam = shares * self.share_variance / 2.0
        if lam <= 0:
            return np.zeros(self.dimension, dtype=np.int64)
        return exact_poisson(rng, lam, self.dimension) - exact_poisson(rng, lam, self.dimension)

    def encode(self, vector: np.ndarray | None, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """The device's contribution: quantised vector + its noise share (None: the noise share alone, which is
        what a device sends when it declines after committing to a round)."""
        if vector is None:
            grid, clamped = np.zeros(self.dimension, dtype=np.int64), 0
        else:
            grid, clamped = self.quantise(vector)
            if grid.size != self.dimension:
                raise ValueError(f"vector of {grid.size} coordinates, expected {self.dimension}")
        return grid + self.noise(rng), clamped

    def decode(self, total: np.ndarray) -> np.ndarray:
        """A (modular uint64 or int64) sum back to real units."""
        signed = np.asarray(total).astype(np.uint64).view(np.int64) if np.asarray(total).dtype == np.uint64 \
            else np.asarray(total, dtype=np.int64)
        return signed.astype(np.float64) * self.grid_step

    def sum_noise_std(self, shares: int) -> float:
        """Std per coordinate, in real units, of the noise in a sum of `shares` contributions."""
        return math.sqrt(shares * self.share_variance) * self.grid_step


def exact_poisson(rng: np.random.Generator, lam: float, size: int) -> np.ndarray:
    """Poisson(lam) draws (int64) whose every integer outcome is reachable: a sum of draws at rates of at most
    EXACT_POISSON_RATE."""
    pieces = max(1, math.ceil(lam / EXACT_POISSON_RATE))
    out = np.zeros(size, dtype=np.int64)
    for _ in range(pieces):
        out += rng.poisson(lam / pieces, size).astype(np.int64)
    return out


def to_modular(grid: np.ndarray) -> np.ndarray:
    """int64 grid values as uint64 residues modulo 2^64 (two's complement: the sum wraps back exactly)."""
    return np.ascontiguousarray(grid, dtype=np.int64).view(np.uint64)


__all__ = ["RDP_ORDERS", "SumMechanism", "accounted_multiplier", "distributed_entries", "skellam_rdp", "to_modular"]


@dataclass
class GridSum:
    """Devices' quantised vectors added up on the grid (int64), before the noise of the shares is added."""

    mechanism: SumMechanism
    total: np.ndarray  # int64 [dimension]
    count: int = 0  # vectors added (each also brings one noise share)
    clamped: int = 0  # coordinates the clamp cut (local diagnostics: never sent)

    @classmethod
    def zeros(cls, mechanism: SumMechanism) -> GridSum:
        return cls(mechanism, np.zeros(mechanism.dimension, dtype=np.int64))

    def add(self, vector: np.ndarray | None) -> None:
        """One device's vector (None: a device that committed but sends its noise share on a zero vector)."""
        if vector is not None:
            grid, clamped = self.mechanism.quantise(vector)
            if grid.size != self.mechanism.dimension:
                raise ValueError(f"vector of {grid.size} coordinates, expected {self.mechanism.dimension}")
            self.total += grid
            self.clamped += clamped
        self.count += 1

    def noised(self, rng: np.random.Generator) -> np.ndarray:
        """The sum plus every added device's noise share, drawn at once (exact: Skellam sums are Skellam)."""
        return self.total + self.mechanism.noise(rng, shares=self.count)


def multiplier_for_accounted(target: float, shares: float = 1.0) -> float:
    """The smallest plan multiplier z whose accounted multiplier (accounted_multiplier(z, shares)) reaches
    `target`: what a server asks for so that a calibrated (Gaussian) sigma holds on the quantised sum."""
    if target <= 0:
        return 0.0
    z = target / math.sqrt(shares)
    for _ in range(50):  # the fixed point converges in a few steps: kappa shrinks as z grows
        z *= target / accounted_multiplier(z, shares)
        if accounted_multiplier(z, shares) >= target:
            return z * (1 + 1e-9)
    return z * 1.001

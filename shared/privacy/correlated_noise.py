"""What correlated noise across rounds (DP-FTRL, matrix factorisation) could gain at a given number of rounds.

The served model is its initial tables plus the server's steps, so after round t it carries the prefix sum of the
rounds' noise. A matrix mechanism releases C x + z for a factorisation A = B C of the prefix-sum matrix A and
serves B (C x + z) = A x + B z. Independent noise each round (what fedrec does) is C = I. Where a device takes part
in every round, its contributions g_1..g_T (each of norm <= 1) may point anywhere, so the sensitivity of C x is at
least sqrt(trace(C^T C)) (orthogonal contributions), and the noise at a fixed epsilon scales with it. Two bounds
follow, for every factorisation (Denisov et al. 2022 and Choquette-Choo et al. 2023 optimise within them):

- the served (last) model: B_T C 1 = T, so ||B_T|| ||C 1|| >= T, and ||C 1|| is the sensitivity of contributions
  that all point one way; independent noise reaches this bound exactly. No correlation makes the final model less
  noisy.
- every intermediate model together: the total squared error times sensitivity squared is at least
  (sum of A's singular values)^2 (Cauchy-Schwarz on trace(A^T A X^-1) trace(X), X = C^T C), against T ||A||_F^2 for
  independent noise; `prefix_gain_bound` is the square root of the ratio, an upper bound on the RMS gain.
  `best_factorization_gain` tightens it: the sensitivity taken as max(trace(X), 1^T X 1) (orthogonal or aligned
  contributions, still no more than the true sensitivity), a Lagrange dual of the least total error bounds what
  any factorisation achieves.

Both assume every device in every round; fedrec's secure modes sample a cohort and charge a device only for the
rounds it joins (at q = 1: the server chose the sample). `cohort_noise_ratio` compares the two at one epsilon, under
Gaussian composition (r releases at multiplier sigma compose to mu = sqrt(r) / sigma).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy.optimize import minimize
from scipy.stats import binom

PARTICIPATION_QUANTILE = 0.9  # as the server calibrates 'auto' (server/core.py)
MAX_OPTIMISED_ROUNDS = 400  # the dual bound takes eigendecompositions of rounds x rounds matrices


def prefix_matrix(rounds: int) -> np.ndarray:
    """A: lower-triangular ones, row t sums the first t rounds."""
    return np.tril(np.ones((rounds, rounds)))


def factorization_cost(b: np.ndarray, c: np.ndarray) -> float:
    """Total squared error of all prefix sums (||B||_F^2) times the squared sensitivity lower bound trace(C^T C),
    per unit of noise at a fixed epsilon; independent noise (B = A, C = I) gives T ||A||_F^2."""
    return float(np.sum(b * b) * np.sum(c * c))


def prefix_gain_bound(rounds: int) -> float:
    """Upper bound on the RMS gain over all prefix sums of any factorisation over independent noise, every device
    in every round: sqrt(T ||A||_F^2) / ||A||_* ."""
    s = np.linalg.svd(prefix_matrix(rounds), compute_uv=False)
    return math.sqrt(rounds * float(np.sum(s * s))) / float(np.sum(s))


def best_factorization_gain(rounds: int) -> float:
    """Upper bound on the RMS gain over independent noise of any factorisation for all prefix sums, every device in
    every round, the sensitivity taken as max(trace(X), 1^T X 1), X = C^T C (orthogonal or aligned contributions:
    a lower bound on the true sensitivity, so the bound holds for the true one too).

    The least cost is min trace(A^T A X^-1) subject to trace(X) <= 1 and 1^T X 1 <= 1, a convex problem; by weak
    duality every lam, mu >= 0 bound it from below by 2 trace((W^1/2 A^T A W^1/2)^1/2) - lam - mu, W = lam I +
    mu 1 1^T. The dual is maximised over (lam, mu) numerically, but any point it reaches is a valid bound."""
    a = prefix_matrix(rounds)
    m, one = a.T @ a, np.ones(rounds)

    def negative_dual(log_multipliers: np.ndarray) -> float:
        lam, mu = np.exp(log_multipliers)
        # W = lam I + mu 1 1^T has eigenvalue lam + T mu on 1 and lam elsewhere: its root in closed form.
        root = (math.sqrt(lam) * np.eye(rounds)
                + (math.sqrt(lam + rounds * mu) - math.sqrt(lam)) * np.outer(one, one) / rounds)
        inner = np.linalg.eigvalsh(root @ m @ root)
        return -(2 * float(np.sum(np.sqrt(np.maximum(inner, 0.0)))) - lam - mu)

    found = min((minimize(negative_dual, np.array(start), method="Nelder-Mead",
                          options={"xatol": 1e-4, "fatol": 1e-9, "maxiter": 1000})
                 for start in ((0.0, 0.0), (2.0, -2.0))), key=lambda r: r.fun)
    least_cost = -negative_dual(found.x)
    return math.sqrt(rounds * float(np.trace(m)) / least_cost)


def rounds_charged(rounds: int, cohort: int, population: int, quantile: float = PARTICIPATION_QUANTILE) -> int:
    """Rounds a device is charged for at the participation quantile (the secure modes' 'auto' calibration)."""
    rate = min(1.0, cohort / max(population, 1))
    return max(1, int(binom.ppf(quantile, rounds, rate)))


def cohort_noise_ratio(rounds: int, cohort: int, population: int) -> float:
    """Noise-to-signal of one round's sum with a sampled cohort, divided by that of the whole population every
    round, at the same per-device epsilon (Gaussian composition at q = 1, no amplification): above 1, the sampled
    cohort is noisier per round."""
    sampled = math.sqrt(rounds_charged(rounds, cohort, population)) / cohort
    full = math.sqrt(rounds) / population
    return sampled / full


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", default="10,50,100", help="round counts (comma-separated)")
    parser.add_argument("--population", type=int, default=610)
    parser.add_argument("--cohort", type=int, default=100)
    args = parser.parse_args(argv)
    print("| rounds | served model: best gain | all models: RMS gain at most (nuclear / dual bound) | "
          f"cohort {args.cohort} of {args.population}: rounds charged | its noise-to-signal / every device every "
          "round |")
    print("|---|---|---|---|---|")
    for rounds in (int(r) for r in args.rounds.split(",")):
        best = f"{best_factorization_gain(rounds):.2f}" if rounds <= MAX_OPTIMISED_ROUNDS else "-"
        print(f"| {rounds} | 1 (none) | {prefix_gain_bound(rounds):.2f} / {best} | "
              f"{rounds_charged(rounds, args.cohort, args.population)} | "
              f"{cohort_noise_ratio(rounds, args.cohort, args.population):.2f} |")


if __name__ == "__main__":
    main()

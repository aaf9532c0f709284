"""User-level (central) DP of DP-FedAvg rounds, accounted with Flower's accountant from the ledger.

A round with central noise releases sum(clip(delta_k, S)) + N(0, (z S)^2): at the user level (one
device's whole data) a Gaussian mechanism with noise multiplier z. The epsilon depends on how the
round's devices were drawn, so each figure names its assumption:
- "poisson": each device independently with rate K/P (add or remove one device) - amplified;
- "fixed": exactly K of P without replacement (replace one device) - amplified;
- "none": no amplification (any sampling, add or remove one device): every round counts in full,
  the figure to use when the sampling cannot be verified.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

from fedrec.shared.config import RunConfig

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting warns about orders it skips

ASSUMPTIONS = {
    "poisson": (SamplingMethod.POISSON, NeighboringRelation.ADD_OR_REMOVE_ONE,
                "devices sampled independently with rate devices-per-round / devices (Poisson); neighbouring: one "
                "device's data added or removed"),
    "fixed": (SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE,
              "exactly devices-per-round devices sampled without replacement; neighbouring: one device's data "
              "replaced"),
    "none": (SamplingMethod.NO_AMPLIFICATION, NeighboringRelation.ADD_OR_REMOVE_ONE,
             "no amplification by sampling (every round counts in full); neighbouring: one device's data added or "
             "removed"),
}


def central_rounds(ledger: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry["central"] for entry in ledger if entry.get("kind") == "train" and entry.get("central")]


def user_level_epsilon(rounds: list[dict[str, Any]], *, assumption: str, delta: float) -> float:
    method, relation, _ = ASSUMPTIONS[assumption]
    population = int(rounds[0]["population"])
    accountant = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                             neighboring_relation=relation, sampling_method=method))
    for record in rounds:
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=float(record["noise_multiplier"]),
                                                sample_size=int(record["sample_size"]),
                                                population_size=int(record["population"])))
    return float(accountant.get_epsilon(delta))


def user_level_summary(config: RunConfig, ledger: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`privacy.user_level` of the summary: epsilon under the run's sampling, and without amplification."""
    rounds = central_rounds(ledger)
    if not rounds:
        return None
    sampling = config.device_sampling
    return {
        "epsilon": user_level_epsilon(rounds, assumption=sampling, delta=config.delta),
        "delta": config.delta,
        "sampling_assumption": ASSUMPTIONS[sampling][2],
        "epsilon_without_amplification": user_level_epsilon(rounds, assumption="none", delta=config.delta),
        "no_amplification_assumption": ASSUMPTIONS["none"][2],
        "noise_multiplier": config.central_noise_multiplier,
        "clip_norm": config.delta_clip_norm,
        "rounds": len(rounds),
        "accountant": "Flower RdpAccountant (dp-accounting RDP)",
    }


def central_record(config: RunConfig, *, population: int, contributors: int) -> dict[str, Any] | None:
    """What the ledger keeps about a round's central noise (the audit recomputes user-level epsilon from it)."""
    if config.central_noise_multiplier <= 0:
        return None
    return {"noise_multiplier": config.central_noise_multiplier, "clip_norm": config.delta_clip_norm,
            "sample_size": min(config.devices_per_round, population), "population": population,
            "contributors": contributors, "sampling": config.device_sampling}

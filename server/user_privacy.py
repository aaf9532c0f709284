"""User-level (central) DP of a run, its DP-FedAvg rounds and its popularity report, accounted from the ledger.

The unit is one device's whole data. Neighbouring relations (Balle, Barthe, Gaboardi 2018):
add/remove one device ("poisson" sampling; a removed device counts as one with an empty log, the
population being public as in McMahan et al. 2018), or replace one device by another ("fixed").

Training round with central noise: it releases (sum_k clip(u_k, S) + N(0, (z S)^2 I)) / D, with
D = devices-per-round capped by the population, fixed before anyone trains (server/core.py
central_denominator). The division is post-processing, so the mechanism is the noisy sum, whose L2
sensitivity is S for add/remove and 2S for replace-one (||u - u'|| <= ||u|| + ||u'||). Its
Gaussian noise multiplier is std / sensitivity: z (add/remove) or z / 2 (replace-one).
dp-accounting takes exactly that ratio: its sampled-without-replacement bound (Wang, Balle,
Kasiviswanathan 2019, Thm. 27) is stated for REPLACE_ONE with the base Gaussian's RDP
alpha / (2 m^2) (Mironov 2017), i.e. m = std / replace-one sensitivity; with the sample equal to the
population it returns that Gaussian unchanged. Handing it z instead of z / 2 under-reports
(z = 2, 100 of 500 devices, 50 rounds, delta 1e-5: 7.9 instead of 20.0). Poisson sampling uses the
sampled Gaussian under add/remove (Mironov, Talwar, Zhang 2019).

Popularity report (round 0): every device sends x + N(0, sigma^2 I) with x in [0, 1]^N (its item
indicator, weights clipped). At the user level the whole indicator is the unit: ||x|| <= sqrt(#distinct
items) (add/remove) and ||x - x'|| <= sqrt(N) (replace-one, entries in [0, 1]); nothing bounds the
distinct items but the catalogue, so the sensitivity is sqrt(N) under both: a Gaussian mechanism with
multiplier sigma / sqrt(N), without amplification (every device reports). Only the device's own noise
is counted: the other reports are independent of its data, so the sum is post-processing of its report
(the figure also holds against whoever sees single reports).

RDP composes across rounds; epsilon comes from dp-accounting's conversion (Canonne, Kamath, Steinke
2020), via Flower's RdpAccountant here and dp-accounting directly in the audit (server/audit.py).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

from fedrec.shared.config import RunConfig
from fedrec.shared.popularity import PopularityPlan

from .core import ServerRandomness, central_denominator

logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting warns about orders it skips


@dataclass(frozen=True)
class Relation:
    name: NeighboringRelation
    sensitivity_factor: float  # L2 sensitivity of the noisy sum, in units of the clip norm S
    amplified: SamplingMethod
    unamplified: SamplingMethod  # Flower pairs NO_AMPLIFICATION with add/remove only: replace-one uses K = P
    text: str


RELATIONS = {
    "poisson": Relation(NeighboringRelation.ADD_OR_REMOVE_ONE, 1.0, SamplingMethod.POISSON,
                        SamplingMethod.NO_AMPLIFICATION,
                        "add/remove one device's whole data; sum sensitivity S (fixed denominator)"),
    "fixed": Relation(NeighboringRelation.REPLACE_ONE, 2.0, SamplingMethod.WITHOUT_REPLACEMENT,
                      SamplingMethod.WITHOUT_REPLACEMENT,
                      "replace one device's whole data by another's; sum sensitivity 2S (fixed denominator)"),
}
SAMPLING_TEXT = {
    "poisson": "devices sampled independently with rate devices-per-round / devices (Poisson)",
    "fixed": "exactly devices-per-round devices sampled without replacement",
}
NO_AMPLIFICATION_TEXT = ("no amplification by sampling (every round counts in full, the figure to use when the "
                         "sampling cannot be verified); same neighbouring relation")
EXCLUDES = ["evaluation replies", "the fact that a device takes part (the population is treated as public)"]


def round_noise_multiplier(noise_multiplier: float, sampling: str) -> float:
    """Std of the noise on the sum (z S) over the sum's sensitivity under the run's relation."""
    return noise_multiplier / RELATIONS[sampling].sensitivity_factor


def popularity_noise_multiplier(sigma: float, num_items: int) -> float:
    """Std of one device's report noise over its indicator's user-level sensitivity sqrt(num_items)."""
    return sigma / math.sqrt(num_items)


def central_rounds(ledger: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry["central"] for entry in ledger if entry.get("kind") == "train" and entry.get("central")]


def popularity_attempts(ledger: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ledger entry per attempt of the popularity round (its outcome when written, else its write-ahead line)."""
    attempts: dict[tuple[int, int], dict[str, Any]] = {}
    for index, entry in enumerate(ledger):
        if entry.get("kind") == "popularity":
            key = (int(entry["round"]), int(entry.get("attempt", -1 - index)))  # old ledgers: a line per attempt
            if key not in attempts or entry.get("central"):
                attempts[key] = entry
    return list(attempts.values())


def popularity_reports(ledger: list[dict[str, Any]], num_items: int | None) -> list[float]:
    """The user-level noise multiplier of every popularity attempt (0: no noise; nan: catalogue size unknown)."""
    out = []
    for entry in popularity_attempts(ledger):
        items = (entry.get("central") or {}).get("num_items", num_items)
        sigma = float(entry["plan"].get("noise-multiplier", 0.0)) if entry["plan"].get("dp") else 0.0
        out.append(math.nan if items is None else popularity_noise_multiplier(sigma, int(items)) if sigma > 0 else 0.0)
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no infinity: null, with a note


def user_level_epsilon(rounds: list[dict[str, Any]], *, sampling: str, delta: float, amplified: bool = True,
                       popularity: list[float] = ()) -> float:
    """Epsilon of the central rounds and popularity reports (by user-level multiplier) under `sampling`'s relation.

    Flower's accountant holds one population: with a varying one, every round's rate is rounded up to
    the smallest population (a larger rate never lowers epsilon), exact when it does not vary.
    """
    if any(m == 0 or math.isnan(m) for m in popularity):
        return math.inf  # a report without noise, or with no bound on its norm
    relation = RELATIONS[sampling]
    population = min(int(r["population"]) for r in rounds) if rounds else 1
    method = relation.amplified if amplified else relation.unamplified
    accountant = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                             neighboring_relation=relation.name, sampling_method=method))
    events: Counter[tuple[float, int]] = Counter()  # identical rounds composed at once: one RDP evaluation each
    for record in rounds:
        size = -(-int(record["sample_size"]) * population // int(record["population"]))  # ceil, in integers
        events[(round_noise_multiplier(float(record["noise_multiplier"]), sampling),
                min(size, population) if amplified else population)] += 1
    events.update((multiplier, population) for multiplier in popularity)  # everyone reports: rate 1, plain Gaussian
    for (multiplier, size), count in sorted(events.items()):
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=multiplier, sample_size=size,
                                                population_size=population), count)
    return float(accountant.get_epsilon(delta))


def user_level_summary(config: RunConfig, ledger: list[dict[str, Any]], *, randomness: ServerRandomness,
                       num_items: int | None = None) -> dict[str, Any] | None:
    """`privacy.user_level` of the summary: epsilon of everything the run released at the user level, and its parts.

    `num_items`: the catalogue size, when the ledger's popularity entry does not record it.
    `randomness`: where central noise and sampling came from.
    """
    rounds = central_rounds(ledger)
    if not rounds:
        return None
    sampling, delta = config.device_sampling, config.delta
    relation = RELATIONS[sampling]
    reports = popularity_reports(ledger, num_items)
    includes = [f"{len(rounds)} training rounds with central noise"]
    if reports:
        includes.append(f"{len(reports)} popularity report(s): Gaussian, user-level sensitivity sqrt(catalogue size)")
    items = next(((e.get("central") or {}).get("num_items", num_items) for e in popularity_attempts(ledger)), None)
    epsilon = user_level_epsilon(rounds, sampling=sampling, delta=delta, popularity=reports)
    out = {
        "epsilon": _finite(epsilon),
        "delta": delta,
        "includes": includes,
        "excludes": EXCLUDES,
        "neighbouring_relation": relation.text,
        "sampling_assumption": SAMPLING_TEXT[sampling],
        "epsilon_without_amplification": _finite(user_level_epsilon(rounds, sampling=sampling, delta=delta,
                                                                    amplified=False, popularity=reports)),
        "no_amplification_assumption": NO_AMPLIFICATION_TEXT,
        "epsilon_training_rounds": _finite(user_level_epsilon(rounds, sampling=sampling, delta=delta)),
        "epsilon_popularity_reports": (_finite(user_level_epsilon([], sampling=sampling, delta=delta,
                                                                  popularity=reports)) if reports else None),
        "noise_multiplier": config.central_noise_multiplier,
        "effective_noise_multiplier": round_noise_multiplier(config.central_noise_multiplier, sampling),
        "clip_norm": config.delta_clip_norm,
        "sum_sensitivity": relation.sensitivity_factor * float(config.delta_clip_norm),
        "mean_denominator": rounds[-1].get("denominator"),
        "popularity_sensitivity": math.sqrt(items) if items else None,
        "rounds": len(rounds),
        "randomness": randomness.describe(),
        "accountant": "Flower RdpAccountant (dp-accounting RDP, default orders)",
    }
    if math.isinf(epsilon):
        out["note"] = ("unbounded (null): a popularity report without noise, or with no known catalogue size to "
                       "bound its norm")
    return out


def central_record(config: RunConfig, *, population: int, contributors: int) -> dict[str, Any] | None:
    """What the ledger keeps about a round's central noise (the audit recomputes user-level epsilon from it)."""
    if config.central_noise_multiplier <= 0:
        return None
    relation = RELATIONS[config.device_sampling]
    return {"noise_multiplier": config.central_noise_multiplier, "clip_norm": config.delta_clip_norm,
            "sample_size": min(config.devices_per_round, population), "population": population,
            "contributors": contributors, "sampling": config.device_sampling,
            "denominator": central_denominator(config, population), "relation": relation.name.value,
            "noise_std_sum": config.central_noise_multiplier * float(config.delta_clip_norm),
            "sum_sensitivity": relation.sensitivity_factor * float(config.delta_clip_norm)}


def popularity_record(plan: PopularityPlan, *, num_items: int) -> dict[str, Any]:
    """What the ledger should keep about the popularity round for user-level accounting (the catalogue size)."""
    return {"num_items": int(num_items), "noise_multiplier": plan.noise_multiplier if plan.dp else 0.0}

"""The run's summary: model metrics, baselines on the same split, and the privacy spent per device."""

from __future__ import annotations

import logging
import statistics
from typing import Any

from fedrec.shared.baselines import CentralMFSettings, central_mf_metrics, popularity_metrics, random_metrics
from fedrec.shared.config import RunConfig
from fedrec.shared.data.population import Population, population_splits
from fedrec.shared.evaluation import METRIC_KEYS
from fedrec.shared.model import ItemTables
from fedrec.shared.ranking import evaluate_with_refit

from .records import LEDGER, RunRecords
from .user_privacy import user_level_summary

log = logging.getLogger("fedrec.server")

NEIGHBOURING_RELATION = ("record level: two behaviour logs of one device are neighbours if they differ by one "
                         "interaction (added or removed); epsilon bounds what everything the device ever sent "
                         "reveals about any single interaction")


def device_epsilons(records: RunRecords) -> tuple[dict[str, float], set[str], set[str]]:
    """Latest reported cumulative epsilon per device, who released anything, and who ever declined (ledger)."""
    latest: dict[str, float] = {}
    released: set[str] = set()
    declined: set[str] = set()
    for entry in records.read_jsonl(LEDGER):
        latest.update(entry.get("epsilon_reported", {}))
        released.update(entry.get("trained", []))
        declined.update(entry.get("declined", []))
    return latest, released, declined


def training_participants(records: RunRecords) -> set[str]:
    return {d for entry in records.read_jsonl(LEDGER) if entry.get("kind") == "train" for d in entry["trained"]}


def privacy_summary(config: RunConfig, records: RunRecords, noise_multiplier: float) -> dict[str, Any]:
    """`privacy` of the summary: record-level epsilon per device, and user-level epsilon when central DP ran."""
    latest, released, declined = device_epsilons(records)
    values = [latest[d] for d in sorted(released) if d in latest]
    record_level: dict[str, Any] = {
        "delta": config.delta,
        "epsilon_max": max(values) if values and config.dp else (None if not config.dp else 0.0),
        "epsilon_median": statistics.median(values) if values and config.dp else (None if not config.dp else 0.0),
        "budget": config.epsilon_budget if config.dp else None,
        "devices_declined": len(declined),
        "devices_trained": len(training_participants(records)),
        "devices_released": len(released),
        "noise_multiplier": noise_multiplier if config.dp else None,
        "sample_rate": config.sample_rate,
        "clip_norm": config.clip_norm,
        "local_steps_per_round": config.local_steps,
        "accountant": "RDP (Opacus; Mironov et al. 2019), conversion of Balle et al. 2020",
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "median_over": "devices that released anything (popularity report or training update)",
    }
    if not config.dp:
        record_level["note"] = "DP disabled: updates are not private (epsilon is infinite)"
    out: dict[str, Any] = {"record_level": record_level}
    user_level = user_level_summary(config, records.read_jsonl(LEDGER))
    if user_level is not None:
        out["user_level"] = user_level
    return out


def reference_metrics(config: RunConfig, population: Population, tables: ItemTables) -> dict[str, Any]:
    """Simulation only: the federated model and the baselines evaluated centrally over every device.

    Ranking uses each device's on-device re-fit, so these are the numbers the devices would
    compute themselves; the simulation can see all data, a deployment's server cannot.
    """
    splits = population_splits(population)
    n = population.num_items
    log.info("evaluating the federated model and baselines on all %d devices", len(splits))
    blocks = {
        "model": evaluate_with_refit(tables, splits, n, l2=config.refit_l2, sampled_seed=config.seed),
        "random": random_metrics(splits, n, seed=config.seed),
        "popularity": popularity_metrics(splits, n, seed=config.seed),
        "central_mf": central_mf_metrics(splits, n, CentralMFSettings(dim=config.embedding_dim), seed=config.seed),
    }
    headline = {name: {k: block[k] for k in METRIC_KEYS} for name, block in blocks.items()}
    sampled = {name: {k: v for k, v in block.items() if k.startswith("sampled_")} for name, block in blocks.items()}
    return {"metrics": headline.pop("model"), "baselines": headline, "sampled_protocol": sampled}

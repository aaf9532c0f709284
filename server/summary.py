"""The run's summary: model metrics, baselines on the same split, and the privacy spent per device."""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any

from fedrec.shared.config import RunConfig
from fedrec.shared.data.population import Population, population_splits
from fedrec.shared.evaluation import METRIC_KEYS
from fedrec.shared.model import ItemTables
from fedrec.shared.ranking import evaluate_with_refit

from .core import ServerRandomness
from .loop import STOP_REQUESTED, Interrupted, secure_aggregation_kind
from .records import LEDGER, RunRecords
from .user_privacy import user_level_summary

log = logging.getLogger("fedrec.server")

NEIGHBOURING_RELATION = ("record level: two behaviour logs of one device are neighbours if one has one (device, "
                         "item) pair more, with all its events; epsilon bounds what everything the device ever "
                         "sent reveals about any such pair (one extra event on an item it has: a group of two)")


TRUST_MODELS = {
    "local": "local DP: every device adds the full noise to what it sends; the guarantee holds against anyone, "
             "the server included",
    "distributed": "distributed DP: the stated epsilon (the headline, epsilon_max_malicious) holds against a server "
                   "that deviates arbitrarily from the secure-aggregation protocol and colludes with at most the c "
                   "devices each device's policy assumes, as long as it cannot enrol identities; against a server "
                   "that follows the protocol it is epsilon_max_honest; against one that also controls enrolment only "
                   "a device's own noise share protects it (epsilon_max_subverted)",
    "none": "no differential privacy: updates are not private",
}
TRUST_MODELS["user"] = TRUST_MODELS["distributed"].replace("distributed DP", "user-level distributed DP")

# The three figures of the secure modes, one line each for the threat it holds against (server/audit.py states the
# same lines in audit.json).
THREATS = {
    "honest": "the server follows the protocol",
    "malicious": "the server deviates arbitrarily and colludes with at most c devices, but cannot enrol identities",
    "own_share": "the server also controls enrolment: only the device's own noise share protects it",
}


def device_epsilons(records: RunRecords, key: str = "epsilon_reported",
                    ) -> tuple[dict[str, float], set[str], set[str]]:
    """Latest reported cumulative epsilon per device, who released anything, and who ever declined (ledger)."""
    latest: dict[str, float] = {}
    released: set[str] = set()
    declined: set[str] = set()
    for entry in records.read_jsonl(LEDGER):
        # the ledger writes an infinite epsilon (a release without DP) as null
        latest.update({d: math.inf if e is None else float(e) for d, e in entry.get(key, {}).items()})
        released.update(entry.get("trained", []))
        declined.update(entry.get("declined", []))
    return latest, released, declined


def _finite(value: float) -> float | None:
    """JSON has no infinity: an infinite epsilon is null (with a note)."""
    return value if math.isfinite(value) else None


def training_participants(records: RunRecords) -> set[str]:
    return {d for entry in records.read_jsonl(LEDGER) if entry.get("kind") == "train" for d in entry.get("trained", [])}


def privacy_summary(config: RunConfig, records: RunRecords, noise_multiplier: float, *,
                    randomness: ServerRandomness) -> dict[str, Any]:
    """`privacy` of the summary: record-level epsilon per device, and user-level epsilon when central DP ran.

    `randomness`: the server's source of central noise and device sampling.
    """
    latest, released, declined = device_epsilons(records)
    values = [latest[d] for d in sorted(released) if d in latest]
    none = None if not config.dp else 0.0
    record_level: dict[str, Any] = {
        "delta": config.delta,
        "epsilon_max": _finite(max(values)) if values and config.dp else none,
        "epsilon_median": _finite(statistics.median(values)) if values and config.dp else none,
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
    # JSON has no infinity: an unbounded epsilon is null, flagged here with the count and a note saying why.
    without_dp = sum(math.isinf(v) for v in values)
    record_level["epsilon_unbounded"] = not config.dp or without_dp > 0
    record_level["devices_without_dp"] = len(released) if not config.dp else without_dp
    if not config.dp:
        record_level["note"] = "DP disabled: updates are not private (epsilon is infinite, null here)"
    elif without_dp:
        record_level["note"] = "some devices released without DP: their epsilon is infinite (null here)"
    # the three figures by threat (equal in the local mode): honest, malicious with c colluders (the headline, the
    # `epsilon_max` above, on which budgets are enforced), own share (`epsilon_max_subverted`)
    threat_figures: dict[str, float | None] = {}
    for name, key in (("epsilon_max_honest", "epsilon_honest_reported"), ("epsilon_max_malicious", "epsilon_reported"),
                      ("epsilon_max_subverted", "epsilon_subverted_reported")):
        figure, _, _ = device_epsilons(records, key)
        figure_values = [figure[d] for d in sorted(released) if d in figure]
        threat_figures[name] = _finite(max(figure_values)) if figure_values and config.dp else none
    aggregation = secure_aggregation_kind(config, simulated=randomness.reproducible)
    out: dict[str, Any] = {"mode": config.privacy, "secure_aggregation": aggregation,
                           "trust_model": TRUST_MODELS[config.privacy]}
    if config.privacy in ("distributed", "user"):
        out["threats"] = {"epsilon_max_honest": THREATS["honest"], "epsilon_max_malicious": THREATS["malicious"],
                          "epsilon_max_subverted": THREATS["own_share"]}
    if config.privacy == "user":
        # devices report their user-level figures in this mode; a user-level guarantee covers every record too
        user_figures = {k: record_level.pop(k) for k in ("epsilon_max", "epsilon_median", "budget")}
        record_level["note"] = ("implied by the user-level guarantee (a record changed inside a device moves its "
                                "clipped update by up to 2S: `fedrec audit` recomputes it from the ledger)")
        out["user_level"] = {**user_figures, **threat_figures, "delta": config.delta,
                             "update_clip": float(config.delta_clip_norm), "noise_multiplier": noise_multiplier,
                             "amplification": "none (the server chose the sample)",
                             "neighbouring_relation": "user level: add or remove one device with all its data"}
    else:
        record_level.update(threat_figures)
    out["record_level"] = record_level
    out["server_randomness"] = randomness.describe()
    # the catalogue size bounds a popularity report's user-level norm
    checkpoint = records.load_checkpoint() if config.central_noise_multiplier > 0 else None
    user_level = user_level_summary(config, records.read_jsonl(LEDGER), randomness=randomness,
                                    num_items=checkpoint.tables.num_items if checkpoint else None)
    if user_level is not None:
        out["user_level"] = user_level  # the trusted-server variant (privacy='local' + central-noise-multiplier)
    return out


def reference_metrics(config: RunConfig, population: Population, tables: ItemTables) -> dict[str, Any]:
    """Simulation only: the federated model and the baselines evaluated centrally over every device.

    Ranking uses each device's on-device re-fit, so these are the numbers the devices would
    compute themselves; the simulation can see all data, a deployment's server cannot.
    """
    # the baselines train a central MF with torch: imported here, not by a deployed ServerApp
    from fedrec.shared.baselines import CentralMFSettings, central_mf_metrics, popularity_metrics, random_metrics

    n = population.num_items
    log.info("evaluating the federated model and 3 baselines centrally on all %d devices (%d items)",
             population.num_devices, n)
    splits = population_splits(population)
    steps = {
        "model": ("the federated model (each device's user row re-fitted)",
                  lambda: evaluate_with_refit(tables, splits, n, l2=config.refit_l2, sampled_seed=config.seed)),
        "random": ("random baseline", lambda: random_metrics(splits, n, seed=config.seed)),
        "popularity": ("popularity baseline", lambda: popularity_metrics(splits, n, seed=config.seed)),
        "central_mf": ("central MF baseline (non-private, trained on every device's data)",
                       lambda: central_mf_metrics(splits, n, CentralMFSettings(dim=config.embedding_dim),
                                                  seed=config.seed)),
    }
    blocks = {}
    for number, (name, (label, evaluate)) in enumerate(steps.items(), 1):
        if STOP_REQUESTED.is_set():  # Ctrl-C of fedrec simulate: every round is checkpointed already
            raise Interrupted("interrupted during the final evaluation", last_round=config.rounds)
        started = time.monotonic()
        log.info("evaluation %d/%d: %s ...", number, len(steps), label)
        blocks[name] = evaluate()
        log.info("evaluation %d/%d: done in %.1fs", number, len(steps), time.monotonic() - started)
    headline = {name: {k: block[k] for k in METRIC_KEYS} for name, block in blocks.items()}
    sampled = {name: {k: v for k, v in block.items() if k.startswith("sampled_")} for name, block in blocks.items()}
    return {"metrics": headline.pop("model"), "baselines": headline, "sampled_protocol": sampled}

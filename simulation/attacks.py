"""Empirical privacy checks from the server's view, which trust no formula.

Item inference: from one device's item update, the server ranks items by how far their row moved
(embedding delta norm) and takes the top as the device's items; AUC and precision@k against the
truth, without DP (expect near-perfect) and with DP (expect near chance).

Canary membership, one run (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1)
training run"): every simulated device gets its own reserved canary item, inserted into its log
with probability 1/2. From the updates the server saw, the attacker scores each canary row
(summed squared movement over the rounds its device trained in), guesses "present" for the
highest scores and "absent" for the lowest, and abstains on the rest. Any epsilon-DP training
(per canary record) makes the number of correct guesses stochastically smaller than
Binomial(guesses, e^eps / (1 + e^eps)); the largest epsilon that the observed count rejects at 95%
confidence is an empirical lower bound, to be compared with the accountant's epsilon. (The
bound ignores delta, whose contribution here is at most about canaries x delta.)

attack_report: the checks of a run's own privacy mode, in the form `fedrec audit --attacks` writes to
RUN/audit-attacks.json (the secure modes' checks are in simulation/secure_attacks.py; the bounds, with delta, in
simulation/audit_bounds.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

from fedrec.shared.config import SECURE_MODES, RunConfig
from fedrec.shared.data.catalogue import Catalogue
from fedrec.shared.data.interactions import DeviceEvents, split_device
from fedrec.shared.data.population import Population, open_population

from . import audit_bounds as bounds
from .plain import run_plain

log = logging.getLogger("fedrec.simulation")
CONFIDENCE = 0.95
GUESS_FRACTION = 0.3  # half of it guessed "present" (top scores), half "absent" (bottom scores)


class CanaryPopulation:
    """A population where device k may hold one extra interaction with its own reserved item."""

    def __init__(self, base: Population, present: np.ndarray) -> None:
        self.base = base
        self.present = present
        self.num_devices = base.num_devices
        self.num_items = base.num_items + base.num_devices  # canary of device k: base items + k

    def canary_item(self, k: int) -> int:
        return self.base.num_items + k

    def device_events(self, k: int) -> DeviceEvents:
        events = self.base.device_events(k)
        if not self.present[k]:
            return events
        # The earliest event: it always lands in the training part of the time-ordered split.
        return DeviceEvents(items=np.append(events.items, self.canary_item(k)),
                            times=np.append(events.times, events.times.min() - 1),
                            weights=np.append(events.weights, np.float32(1.0)))

    def catalogue(self) -> Catalogue:
        base = self.base.catalogue()
        extra = self.num_devices
        return Catalogue(item_ids=base.item_ids + tuple(f"canary-{k}" for k in range(extra)),
                         titles=None if base.titles is None else base.titles + ("",) * extra,
                         categories=None if base.categories is None else base.categories + ("",) * extra)


@dataclass
class ServerView:
    """What the attacker keeps from the updates it saw."""

    first_updates: dict[str, np.ndarray]  # device -> per-item movement in the first round it trained
    canary_score: np.ndarray  # per device: summed squared movement of its canary row


def mann_whitney_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / max(n_pos * n_neg, 1))


def epsilon_lower_bound(correct: int, guesses: int, confidence: float = CONFIDENCE) -> float:
    """Largest epsilon for which `correct` of `guesses` right would be too lucky (one-sided test)."""
    if guesses == 0:
        return 0.0

    def tail(eps: float) -> float:
        p = 1.0 / (1.0 + np.exp(-eps))
        return float(binom.sf(correct - 1, guesses, p))

    if tail(0.0) > 1 - confidence:
        return 0.0
    lo, hi = 0.0, 50.0
    if tail(hi) <= 1 - confidence:
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        if tail(mid) <= 1 - confidence:
            lo = mid
        else:
            hi = mid
    return lo


def observe_server(population: CanaryPopulation, config: RunConfig) -> tuple[ServerView, Any]:
    index = {f"sim-{k}": k for k in range(population.num_devices)}
    view = ServerView(first_updates={}, canary_score=np.zeros(population.num_devices))

    def observe(_: int, updates: dict) -> None:
        for device, (emb, bias) in updates.items():
            k = index[device]
            movement = np.sum(emb.astype(np.float64) ** 2, axis=1) + bias.astype(np.float64) ** 2
            view.first_updates.setdefault(device, movement)
            view.canary_score[k] += movement[population.canary_item(k)]

    result = run_plain(config, population=population, observe=observe)
    return view, result


def item_inference(view: ServerView, population: CanaryPopulation) -> dict[str, float]:
    """Rank catalogue items by how far each device's first update moved them; the device's items should top it."""
    aucs, precisions, chance = [], [], []
    base_items = population.base.num_items
    for device, movement in view.first_updates.items():
        split = split_device(population.device_events(int(device.split("-")[1])))
        truth = np.zeros(base_items, dtype=bool)
        truth[split.train_items[split.train_items < base_items]] = True
        scores = movement[:base_items]
        aucs.append(mann_whitney_auc(scores, truth))
        precisions.append(float(truth[np.argsort(-scores)[: truth.sum()]].mean()))
        chance.append(float(truth.mean()))
    return {"auc": float(np.mean(aucs)), "precision_at_k": float(np.mean(precisions)),
            "chance_precision": float(np.mean(chance)), "devices": len(aucs)}


def canary_audit(view: ServerView, population: CanaryPopulation) -> dict[str, Any]:
    trained = view.canary_score > 0  # devices the server saw at least once
    scores, present = view.canary_score[trained], population.present[trained]
    per_side = int(GUESS_FRACTION * len(scores) / 2)
    order = np.argsort(scores, kind="stable")
    guessed_in, guessed_out = order[len(order) - per_side:], order[:per_side]
    correct = int(present[guessed_in].sum() + (~present[guessed_out]).sum())
    guesses = 2 * per_side
    return {"canaries": int(trained.sum()), "guesses": guesses, "correct": correct,
            "epsilon_lower_bound": epsilon_lower_bound(correct, guesses), "confidence": CONFIDENCE}


def attack_config(base: RunConfig, *, dp: bool) -> RunConfig:
    # Every item trains (no head): a rare canary item would otherwise stay outside the head and never move, and
    # the attack would find nothing whatever the noise. The guarantee holds for any head; this is its hardest case.
    base = base.replace(out_dir="", state_dir="", resume=False, trained_items=0)
    return base if dp else base.without_dp()


def run_attacks(config: RunConfig) -> dict[str, Any]:
    """Both checks, with and without DP, on `config`'s synthetic population (kept small: minutes)."""
    base = open_population(config)
    present = np.random.default_rng([config.seed, 0xCA4A]).random(base.num_devices) < 0.5
    population = CanaryPopulation(base, present)
    out: dict[str, Any] = {"item_inference": {}, "canary": {}}
    for dp in (True, False):
        run_config = attack_config(config, dp=dp)
        log.info("attack simulation %s DP: %d devices, %d rounds", "with" if dp else "without",
                 population.num_devices, run_config.rounds)
        view, result = observe_server(population, run_config)
        key = "dp" if dp else "no_dp"
        out["item_inference"][key] = item_inference(view, population)
        canary = canary_audit(view, population)
        if dp:
            canary["epsilon_accountant"] = max(result.epsilon.values())
            out["canary"].update(canary)
        else:
            out["canary"]["no_dp"] = canary
    out["canary"]["delta"] = config.delta
    out["setup"] = {"devices": population.num_devices, "items": base.num_items, "canary_items": population.num_devices,
                    "rounds": config.rounds, "devices_per_round": config.devices_per_round,
                    "epsilon_budget": config.epsilon_budget}
    return out


def default_attack_config() -> RunConfig:
    """A small synthetic federation for the checks (every device joins several rounds)."""
    return RunConfig().replace(devices=1000, synthetic_items=300, synthetic_topics=10, rounds=15,
                               devices_per_round=200, eval_every=1000)


BOUND_MEANING = "the true epsilon is at least this; 0 means the attack found no evidence"
ESTIMATE_MEANING = ("what this attacker achieves, from a Gaussian fit of its scores: an estimate of the true "
                    "epsilon, not a bound (the truth may be lower or higher)")


def attack_entry(name: str, threat: str, *, scores: np.ndarray, present: np.ndarray, delta: float,
                 accountant: float | None) -> dict[str, Any]:
    """One one-run attack in the audit-attacks.json form: guesses from `scores` of the canaries in `present`."""
    per_side = int(GUESS_FRACTION * len(scores) / 2)
    guesses, correct = bounds.guess_from_scores(scores, present, per_side=per_side)
    m = len(scores)
    return {"name": name, "threat": threat,
            "success": {"hits": correct, "trials": guesses, "label": "guesses right of guesses made"},
            "bound": bounds.one_run_lower_bound(canaries=m, guesses=guesses, correct=correct, delta=delta),
            "bound_kind": "lower bound",
            "max_bound": bounds.one_run_max_bound(canaries=m, guesses=guesses, delta=delta),
            "meaning": BOUND_MEANING, "canaries": m, "epsilon_accountant": accountant}


def attack_report(config: RunConfig, *, from_audited_run: bool) -> dict[str, Any]:
    """The empirical checks of `config`'s privacy mode on its federation (a synthetic or the run's own data)."""
    config = config.replace(out_dir="", state_dir="", resume=False)
    base = open_population(config)
    federation = {"mode": config.privacy, "epsilon": config.epsilon_budget if config.dp else None,
                  "delta": config.delta, "devices": base.num_devices, "items": base.num_items,
                  "rounds": config.rounds, "devices_per_round": config.devices_per_round,
                  "dataset": config.dataset, "seed": config.seed, "from_audited_run": from_audited_run}
    if config.dp and config.privacy in SECURE_MODES:
        from .secure_attacks import secure_attack_entries

        federation["canaries"] = base.num_devices
        attacks = secure_attack_entries(config, base)
    else:
        attacks = local_attack_entries(config, base)
        federation["canary_items"] = base.num_devices
    return {"federation": federation, "attacks": attacks}


def local_attack_entries(config: RunConfig, base: Population) -> list[dict[str, Any]]:
    """Local mode (or no DP): the server sees every device's update; item inference and record canaries."""
    present = np.random.default_rng([config.seed, 0xCA4A]).random(base.num_devices) < 0.5
    population = CanaryPopulation(base, present)
    log.info("attack federation (%s): %d devices, %d rounds", config.privacy, population.num_devices, config.rounds)
    view, result = observe_server(population, config)
    inference = item_inference(view, population)
    held = recovered = 0
    for device, movement in view.first_updates.items():
        split = split_device(population.device_events(int(device.split("-")[1])))
        truth = np.zeros(base.num_items, dtype=bool)
        truth[split.train_items[split.train_items < base.num_items]] = True
        held += int(truth.sum())
        recovered += int(truth[np.argsort(-movement[: base.num_items])[: truth.sum()]].sum())
    threat = "the server reads every device's update (local mode)"
    trained = np.zeros(population.num_devices, dtype=bool)  # devices the server saw at least once
    trained[[int(device.split("-")[1]) for device in view.first_updates]] = True
    finite = [e for e in result.epsilon.values() if np.isfinite(e)]
    return [
        {"name": "item inference", "threat": threat,
         "success": {"hits": recovered, "trials": held, "label": "items recovered of items held"},
         "bound": None, "bound_kind": "none", "max_bound": None,
         "meaning": (f"AUC {inference['auc']:.3f} (0.5 = chance; chance recovers about "
                     f"{inference['chance_precision']:.1%} of items held); no epsilon figure from this attack"),
         "auc": inference["auc"]},
        attack_entry("record canaries", threat, scores=view.canary_score[trained], present=present[trained],
                     delta=config.delta, accountant=max(finite) if finite and config.dp else None),
    ]


ATTACKS_FILE = "audit-attacks.json"


def attack_federation(run_dir: str | None, overrides: dict[str, Any]) -> tuple[RunConfig, bool]:
    """The attack federation's settings: the audited run's own (RUN/config.json), else the small synthetic default;
    then `overrides` (run-config keys). The flag says whether they are the audited run's, unchanged."""
    from pathlib import Path

    if run_dir:
        base = RunConfig.load_json(Path(run_dir) / "config.json")
    else:
        base = default_attack_config()
    if overrides:
        base = RunConfig.from_mapping({**base.to_mapping(), **overrides}, source="fedrec audit --attacks --run-config")
    return base, bool(run_dir) and not overrides


def format_attacks(report: dict[str, Any]) -> list[str]:
    """Console lines: the federation the attacks ran on, then one line per attack."""
    fed = report["federation"]
    source = "the audited run's settings" if fed["from_audited_run"] else "a separate federation"
    eps = "no DP" if fed["epsilon"] is None else f"epsilon budget {fed['epsilon']:g}"
    lines = [f"empirical attacks on {source}: {fed['mode']} mode, {eps}, {fed['devices']} devices, {fed['items']} "
             f"items, {fed['rounds']} rounds ({fed['dataset']})"]
    for a in report["attacks"]:
        s = a["success"]
        line = f"  {a['name']}: {s['hits']} of {s['trials']} {s['label']}"
        if a["bound"] is not None:
            line += f"; empirical epsilon {a['bound_kind']} {a['bound']:.2f}"
            if a["max_bound"] is not None:
                line += f" (at most {a['max_bound']:.2f} with this many guesses)"
            if a.get("epsilon_accountant") is not None:
                line += f", accountant {a['epsilon_accountant']:.2f}"
        lines.append(f"{line} - {a['meaning']}")
    return lines

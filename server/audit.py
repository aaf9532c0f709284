"""Independent audit of a run's privacy claims, from its run directory alone (no device data or code).

1. read config.json and the ledger (a line torn by a crash ends it, and is reported);
2. re-derive from every round's *plan* (not from what the server summarised) the DP steps it
   asked of each device, and check the plan against the run's config;
3. per device, compose the steps of every release the server received from it (training rounds,
   popularity report, evaluation releases) and recompute epsilon with Google's dp-accounting: RDP
   at the same orders and conversion as the devices (the comparison), and PLD (a tighter
   reference) - an accountant the devices did not use;
4. charge, on top, everything a device may have released unseen: replies the server rejected,
   devices that failed (their reply may have been lost after they trained), and every device asked
   in a round that was written ahead but never completed (the server stopped mid-round);
5. flag any device whose reported epsilon is below what it released (tampering) or above all it
   could have been charged, any device over its budget, and any round whose parameters differ
   from the config;
6. the same for user-level (central) DP when the run used it, under each sampling assumption.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedrec.shared.config import AUTO, ConfigError, RunConfig
from fedrec.shared.distributed_dp import distributed_entries

from .records import CONFIG, LEDGER, RunRecords

# The devices' accountant uses Opacus's orders; the audit evaluates RDP at the same ones.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
PLD_DISCRETIZATION = 1e-4
DEFAULT_TOLERANCE = 1e-3  # relative; dp-accounting's and Opacus's RDP code differ by ~1e-5 here

NEIGHBOURING = ("Record level, per device: two behaviour logs of the same device are neighbours if one has one "
                "(device, item) pair more, with all its events (repeats of an item are merged before training). A "
                "device's epsilon bounds what everything it ever sent - its popularity report, its item updates and "
                "its evaluation releases - reveals about any such pair; one extra event on an item it already has is "
                "covered as a group of two pairs.")
SAMPLING = ("Within a device, each DP-SGD step samples every interaction independently with the rate q the server "
            "fixed (Poisson sampling), which is what the accounting assumes. Which devices take part in a round is "
            "chosen by the server, which therefore knows it: record-level epsilon takes no amplification from "
            "device sampling.")
NOT_COVERED = ("Not covered by the record-level guarantee: the fact that a device takes part at all (and when it "
               "refuses or declines, which depends on its own settings and public plans only), and the time its "
               "reply takes (local training grows with its sampled batch). Evaluation releases are covered: noised "
               "on the device and charged like any release.")

Step = tuple[float, float, int]  # (noise multiplier, sampling rate, steps), as in the devices' history


@dataclass
class Flag:
    severity: str  # "error" fails the audit, "warning" and "info" do not
    code: str
    message: str
    device: str | None = None
    round: int | None = None


@dataclass
class DeviceAudit:
    device: str
    rounds: list[int] = field(default_factory=list)  # rounds it released something in
    steps: list[Step] = field(default_factory=list)
    unseen_steps: list[Step] = field(default_factory=list)  # rejected, failed, or asked in an unfinished round
    reported: float | None = None  # latest epsilon it reported (inf: it released something without DP)
    recomputed_rdp: float = 0.0
    recomputed_pld: float = 0.0
    charged_rdp: float = 0.0  # recomputed over steps + unseen_steps: the most it can have spent
    subverted_steps: list[Step] = field(default_factory=list)  # the same releases, own noise share only
    reported_subverted: float | None = None
    recomputed_subverted: float = 0.0
    trajectory: list[tuple[int, float]] = field(default_factory=list)  # (round, recomputed epsilon after it)


def plan_noise(entry: dict[str, Any]) -> list[Step]:
    """The noise a round's plan asks for, as (sigma, q, steps), derived from the plan itself."""
    plan = entry["plan"]
    if not plan.get("dp", False):
        return []
    if entry.get("kind") in ("popularity", "evaluate") or plan.get("privacy") == "user":
        return [(float(plan["noise-multiplier"]), 1.0, 1)]
    if plan.get("privacy") == "distributed":
        steps = [(float(plan["noise-multiplier"]), 1.0, 1)]
    else:
        steps = [(float(plan["noise-multiplier"]), float(plan["sample-rate"]), int(plan["steps"]))]
    if int(plan.get("user-steps", 0)) > 0:
        steps.append((float(plan["user-noise-multiplier"]), float(plan["sample-rate"]), int(plan["user-steps"])))
    return steps


def plan_steps(entry: dict[str, Any], *, subverted: bool = False) -> list[Step]:
    """The history a round adds to each device it reached, at the unit the devices report in the run's mode.

    Local mode: the noise itself. Distributed and user modes: the item release goes into a secure sum of at
    least t_min shares (the ledger's write-ahead line records t_min), accounted by the quantised Skellam bound
    (fedrec.shared.distributed_dp, checked against the exact divergence in its tests); `subverted`: only the
    device's own share, 1/t_min of the sum's variance. User mode reports user-level figures.
    """
    noise = plan_noise(entry)
    mode = entry["plan"].get("privacy", "local")
    if not noise or mode not in ("distributed", "user"):
        return noise
    t_min = int(entry.get("t_min", 0))
    if t_min < 1:
        return [(0.0, 1.0, 1)]  # no threshold recorded: nothing can be claimed (epsilon inf)
    honest, own = distributed_entries(noise[0][0], t_min)
    return [own if subverted else honest, *noise[1:]]


def _compact(steps: Iterable[Step]) -> tuple[Step, ...]:
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, n in steps:
        merged[(sigma, q)] = merged.get((sigma, q), 0) + int(n)
    return tuple(sorted((s, q, n) for (s, q), n in merged.items() if n > 0))


def _event(sigma: float, q: float) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    return gaussian if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)


@lru_cache(maxsize=4096)
def rdp_epsilon(steps: tuple[Step, ...], delta: float) -> float:
    if not steps:
        return 0.0
    accountant = RdpAccountant(orders=list(RDP_ORDERS))
    for sigma, q, n in steps:
        accountant.compose(_event(sigma, q), n)
    return float(accountant.get_epsilon(delta))


@lru_cache(maxsize=4096)
def pld_epsilon(steps: tuple[Step, ...], delta: float) -> float:
    if not steps:
        return 0.0
    accountant = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for sigma, q, n in steps:
        accountant.compose(_event(sigma, q), n)
    return float(accountant.get_epsilon(delta))


def classic_rdp_conversion(orders: Sequence[float], rdp: Sequence[float], delta: float) -> float:
    """epsilon = min over orders of rdp - log(delta) / (order - 1) (Mironov 2017, Prop. 3); TF Privacy's tables."""
    return float(min(r - math.log(delta) / (a - 1) for a, r in zip(orders, rdp)))


# User-level orders: dp-accounting's defaults, the grid of the server's (Flower's) accountant, so an
# honest claim is not flagged for a difference of grid.
USER_LEVEL_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])


def user_level_event(record: dict[str, Any], *, sampling: str, amplified: bool) -> dp_accounting.DpEvent:
    """One central round as dp-accounting sees it, derived here from the plan (z, S, sizes), not the server's code.

    The round adds N(0, (z S)^2) to the sum of clipped updates (the fixed denominator is post-processing).
    dp-accounting's noise multiplier is std / L2 sensitivity under the accountant's relation: replacing one
    device moves the sum by up to 2S (its update out, another's in), adding or removing one by up to S.
    """
    std = float(record["noise_multiplier"]) * float(record["clip_norm"])
    sensitivity = (2.0 if sampling == "fixed" else 1.0) * float(record["clip_norm"])
    gaussian = dp_accounting.GaussianDpEvent(std / sensitivity)
    population, size = int(record["population"]), int(record["sample_size"])
    if not amplified:
        return gaussian
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(size / population, gaussian)
    return dp_accounting.SampledWithoutReplacementDpEvent(population, size, gaussian)


def user_level_epsilon(central: list[dict[str, Any]], *, sampling: str, delta: float, amplified: bool = True,
                       popularity: Sequence[tuple[float, int | None]] = ()) -> float:
    """User-level epsilon of the central rounds and popularity reports, straight from dp-accounting.

    `popularity`: (noise multiplier sigma, catalogue size N) per popularity round. A report is x + N(0, sigma^2)
    with x in [0, 1]^N; the whole x is the unit, its norm (and any two's difference) bounded only by sqrt(N).
    """
    relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if sampling == "fixed"
                else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant = RdpAccountant(orders=list(USER_LEVEL_ORDERS), neighboring_relation=relation)
    events = Counter(user_level_event(record, sampling=sampling, amplified=amplified) for record in central)
    for event, count in events.items():  # identical rounds at once: the subsampled RDP is slow to evaluate
        accountant.compose(event, count)
    for sigma, items in popularity:
        if not sigma > 0 or not items:
            return math.inf  # a report without noise, or with no known bound on its norm
        accountant.compose(dp_accounting.GaussianDpEvent(sigma / math.sqrt(items)))
    return float(accountant.get_epsilon(delta))


def _popularity_reports(entries: list[dict[str, Any]], run_dir: Path) -> list[tuple[float, int | None]]:
    """(sigma, catalogue size) of every popularity round; the size from the ledger, else the checkpoint's tables."""
    attempts: dict[tuple[int, int], dict[str, Any]] = {}  # one per attempt: write-ahead and outcome lines share it
    for index, entry in enumerate(entries):
        if entry.get("kind") == "popularity":
            key = (int(entry["round"]), int(entry.get("attempt", -1 - index)))
            if key not in attempts or entry.get("central"):
                attempts[key] = entry
    reports = list(attempts.values())
    if not reports:
        return []
    checkpoint = RunRecords(run_dir).load_checkpoint()
    fallback = checkpoint.tables.num_items if checkpoint else None
    return [(float(e["plan"].get("noise-multiplier", 0.0)) if e["plan"].get("dp") else 0.0,
             (e.get("central") or {}).get("num_items", fallback)) for e in reports]


def _central_flags(record: dict[str, Any], rnd: int, config: RunConfig) -> list[Flag]:
    """A central round's parameters against the config: noise, clip, sampling, sample size, fixed denominator."""
    population = int(record["population"])
    planned = min(config.devices_per_round, population)
    flags = []
    if (record["noise_multiplier"], record["clip_norm"]) != (config.central_noise_multiplier, config.delta_clip_norm):
        flags.append(Flag("error", "central_plan_differs_from_config", f"round {rnd}: central noise "
                          f"{record['noise_multiplier']} / clip {record['clip_norm']} differ from the config",
                          round=rnd))
    if record.get("sampling", config.device_sampling) != config.device_sampling or record["sample_size"] != planned:
        flags.append(Flag("error", "central_plan_differs_from_config", f"round {rnd}: sampling "
                          f"{record.get('sampling')} of {record['sample_size']}, config says {config.device_sampling} "
                          f"of {planned}", round=rnd))
    if "denominator" not in record:
        flags.append(Flag("warning", "central_denominator_unrecorded", f"round {rnd}: no fixed denominator recorded; "
                          "a mean over the realised count is data-dependent", round=rnd))
    elif int(record["denominator"]) != planned:
        flags.append(Flag("error", "central_denominator_not_fixed", f"round {rnd}: mean over {record['denominator']}, "
                          f"not the planned {planned}", round=rnd))
    return flags


def audit_user_level(entries: list[dict[str, Any]], config: RunConfig, run_dir: Path,
                     tolerance: float) -> tuple[dict[str, Any] | None, list[Flag]]:
    rounds = [(int(e["round"]), e["central"]) for e in entries if e.get("kind") == "train" and e.get("central")]
    if not rounds:
        return None, []
    central = [record for _, record in rounds]
    flags = [flag for rnd, record in rounds for flag in _central_flags(record, rnd, config)]
    sampling, delta = config.device_sampling, config.delta
    reports = _popularity_reports(entries, run_dir)
    recomputed = user_level_epsilon(central, sampling=sampling, delta=delta, popularity=reports)
    out = {"epsilon_recomputed": recomputed, "sampling": sampling, "rounds": len(central),
           "popularity_reports": len(reports),
           "epsilon_recomputed_without_amplification": user_level_epsilon(central, sampling=sampling, delta=delta,
                                                                           amplified=False, popularity=reports),
           "epsilon_recomputed_training_rounds": user_level_epsilon(central, sampling=sampling, delta=delta),
           "accountant": "dp-accounting RDP (default orders), replace-one sensitivity 2S / add-remove S"}
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        claimed = json.loads(summary_path.read_text()).get("privacy", {}).get("user_level", {}).get("epsilon")
        out["epsilon_claimed"] = claimed
        if claimed is not None and claimed < recomputed * (1 - tolerance):
            flags.append(Flag("error", "user_level_under_reported",
                              f"summary claims user-level epsilon {claimed:.6g}, the ledger implies {recomputed:.6g}"))
    return out, flags


def read_ledger(run_dir: Path) -> tuple[list[dict[str, Any]], list[Flag]]:
    path = Path(run_dir) / LEDGER
    if not path.exists():
        raise ConfigError(f"{path}: no ledger; is {run_dir} a fedrec run directory?")
    entries, flags = [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            severity = "warning" if number == len(lines) else "error"
            flags.append(Flag(severity, "ledger_unreadable_line",
                              f"{path}: line {number} is not JSON ({'torn by a crash' if severity == 'warning' else 'damaged'})"))
    return entries, flags


def check_plan(entry: dict[str, Any], config: RunConfig, sigma: dict[str, float]) -> list[Flag]:
    """Differences between a round's plan and what the run's config implies."""
    plan, kind, rnd = entry["plan"], entry.get("kind", "train"), entry.get("round")
    expected: dict[str, Any] = {"dp": config.dp, "delta": config.delta}
    if config.privacy in ("distributed", "user") and kind != "evaluate":
        expected["privacy"] = config.privacy
    if kind == "train":  # every field of the plan: any of them can change what a device's reply reveals
        expected.update({"sample-rate": config.sample_rate, "clip-norm": config.clip_norm,
                         "steps": config.local_steps, "user-steps": config.user_steps, "lr": config.local_lr,
                         "user-lr": config.user_lr, "user-step-cap": config.user_step_cap,
                         "user-scale": config.user_scale, "bias-scale": config.bias_scale,
                         "train-biases": config.train_biases, "num-negatives": config.num_negatives,
                         "grad-sample-mode": config.grad_sample_mode})
    elif kind == "evaluate":
        expected["refit-l2"] = config.refit_l2
    flags = [Flag("error", "plan_differs_from_config", f"round {rnd}: {key}={plan.get(key)!r}, config says {value!r}",
                  round=rnd) for key, value in expected.items() if plan.get(key) != value]
    if not config.dp:
        return flags
    noise = float(plan.get("noise-multiplier", float("nan")))
    configured = {"train": config.noise_multiplier, "popularity": config.prior_noise_multiplier,
                  "evaluate": config.eval_noise_multiplier}.get(kind, AUTO)
    if configured != AUTO and not math.isclose(noise, float(configured), rel_tol=1e-9):
        flags.append(Flag("error", "plan_differs_from_config",
                          f"round {rnd}: noise-multiplier {noise}, config says {configured}", round=rnd))
    if sigma.setdefault(kind, noise) != noise:
        flags.append(Flag("error", "noise_changed",
                          f"round {rnd}: noise-multiplier {noise} differs from earlier rounds ({sigma[kind]})",
                          round=rnd))
    if kind == "train" and config.user_steps and config.privacy != "user":
        ratio = float(plan.get("user-noise-multiplier", float("nan"))) / noise
        if not math.isclose(ratio, config.user_noise_ratio, rel_tol=1e-6):
            flags.append(Flag("error", "plan_differs_from_config",
                              f"round {rnd}: user noise ratio {ratio:.6g}, config says {config.user_noise_ratio}",
                              round=rnd))
    listed = [tuple(step) for step in entry.get("privacy_steps", [])]
    if _compact(listed) != _compact(plan_noise(entry)):
        flags.append(Flag("error", "ledger_steps_inconsistent",
                          f"round {rnd}: ledger lists privacy steps {listed}, the plan implies {plan_noise(entry)}",
                          round=rnd))
    return flags


def attempts(entries: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Each attempt of a round as (its write-ahead line, its outcome line or None if it never completed).

    A ledger from before write-ahead lines has outcome lines only; each is then its own attempt.
    """
    out: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    open_: dict[tuple[str, int, int], int] = {}  # attempts written ahead, not yet completed -> index in out
    for entry in entries:
        key = (entry.get("kind", "train"), int(entry["round"]), int(entry.get("attempt", 0)))
        status = entry.get("status", "done")
        if status == "sent":
            open_[key] = len(out)
            out.append((entry, None))
        elif key in open_:
            index = open_.pop(key)
            out[index] = (out[index][0], entry)
        else:
            out.append((entry, entry))
    return out


def audit_run(run_dir: Path, *, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """The machine-readable verdict (also the body of audit.json)."""
    run_dir = Path(run_dir)
    config = RunConfig.load_json(run_dir / CONFIG)
    entries, flags = read_ledger(run_dir)
    devices: dict[str, DeviceAudit] = {}
    sigma: dict[str, float] = {}
    seen_rounds: set[tuple[str, int]] = set()
    for sent, done in attempts(entries):
        rnd, kind = int(sent["round"]), sent.get("kind", "train")
        if (kind, rnd) in seen_rounds:
            flags.append(Flag("info", "round_repeated", f"{kind} round {rnd} was started again (a resumed run re-ran "
                                                        "it); devices are charged for every attempt", round=rnd))
        seen_rounds.add((kind, rnd))
        flags.extend(check_plan(sent, config, sigma))
        if done is not None and done is not sent and \
                (done.get("plan"), done.get("privacy_steps")) != (sent.get("plan"), sent.get("privacy_steps")):
            flags.append(Flag("error", "ledger_lines_disagree", f"{kind} round {rnd}: the outcome line's plan differs "
                                                                "from the plan written ahead of sending", round=rnd))
        steps = plan_steps(sent)
        own_steps = plan_steps(sent, subverted=True)
        if done is None:
            flags.append(Flag("info", "round_unfinished", f"{kind} round {rnd} was sent but never completed (the "
                                                          "server stopped); every device asked is charged for it",
                              round=rnd))
            for device in sent.get("asked", []):
                devices.setdefault(device, DeviceAudit(device)).unseen_steps.extend(steps)
            continue
        reported = done.get("epsilon_reported", {})
        for device in done.get("trained", []):
            audit = devices.setdefault(device, DeviceAudit(device))
            audit.rounds.append(rnd)
            audit.steps.extend(steps)
            audit.subverted_steps.extend(own_steps)
            audit.trajectory.append((rnd, rdp_epsilon(_compact(audit.steps), config.delta)))
            if device not in reported and config.dp:
                flags.append(Flag("error", "epsilon_not_reported", f"round {rnd}: {device} released an update but "
                                                                   "reported no epsilon", device=device, round=rnd))
        for device in [*done.get("rejected", {}), *done.get("failed", {})]:
            devices.setdefault(device, DeviceAudit(device)).unseen_steps.extend(steps)
        for device, eps in reported.items():
            devices.setdefault(device, DeviceAudit(device)).reported = math.inf if eps is None else float(eps)
        for device, eps in done.get("epsilon_subverted_reported", {}).items():
            devices.setdefault(device, DeviceAudit(device)).reported_subverted = \
                math.inf if eps is None else float(eps)
    for audit in devices.values():
        compact = _compact(audit.steps)
        audit.recomputed_rdp = rdp_epsilon(compact, config.delta)
        audit.recomputed_pld = pld_epsilon(compact, config.delta)
        audit.charged_rdp = rdp_epsilon(_compact([*audit.steps, *audit.unseen_steps]), config.delta)
        audit.recomputed_subverted = rdp_epsilon(_compact(audit.subverted_steps), config.delta)
        flags.extend(_device_flags(audit, config, tolerance))
    user_level, user_flags = audit_user_level(entries, config, run_dir, tolerance)
    result = _verdict(config, devices, flags + user_flags, tolerance, run_dir)
    if user_level is not None:
        result["user_level"] = user_level
    if config.privacy in ("distributed", "user"):
        result["secure_aggregation"] = {
            "unit": "user level" if config.privacy == "user" else "record level",
            "epsilon_max_subverted_recomputed": _json_number(max((a.recomputed_subverted for a in devices.values()),
                                                                 default=0.0)),
            "note": "honest-but-curious figures above; against a server that subverts aggregation only each "
                    "device's own noise share (1/t_min of the sum's variance) protects it"}
    return result


def _device_flags(audit: DeviceAudit, config: RunConfig, tolerance: float) -> list[Flag]:
    if not config.dp:
        return []
    flags = []
    recomputed, charged, reported = audit.recomputed_rdp, audit.charged_rdp, audit.reported
    if reported is not None:
        if reported < recomputed * (1 - tolerance) - 1e-12:
            flags.append(Flag("error", "epsilon_under_reported", f"{audit.device} reported epsilon {reported:.6g}, "
                              f"what the server received from it implies {recomputed:.6g}", device=audit.device))
        elif reported > charged * (1 + tolerance) + 1e-12:
            flags.append(Flag("error", "epsilon_over_reported", f"{audit.device} reported epsilon {reported:.6g}, "
                              f"more than all it could have been charged ({charged:.6g}): the ledger misses "
                              "releases", device=audit.device))
    if audit.reported_subverted is not None and config.privacy in ("distributed", "user") and \
            audit.reported_subverted < audit.recomputed_subverted * (1 - tolerance) - 1e-12:
        flags.append(Flag("error", "subverted_epsilon_under_reported",
                          f"{audit.device} reported epsilon {audit.reported_subverted:.6g} against subverted "
                          f"aggregation, its own noise shares imply {audit.recomputed_subverted:.6g}",
                          device=audit.device))
    if recomputed > config.epsilon_budget * (1 + tolerance):
        flags.append(Flag("error", "over_budget", f"{audit.device}: recomputed epsilon {recomputed:.6g} exceeds the "
                          f"budget {config.epsilon_budget}", device=audit.device))
    elif charged > config.epsilon_budget * (1 + tolerance):
        flags.append(Flag("warning", "may_be_over_budget", f"{audit.device}: charged with every release it may have "
                          f"made unseen, epsilon {charged:.6g} exceeds the budget {config.epsilon_budget}",
                          device=audit.device))
    return flags


def _verdict(config: RunConfig, devices: dict[str, DeviceAudit], flags: list[Flag], tolerance: float,
             run_dir: Path) -> dict[str, Any]:
    reported = [d.reported for d in devices.values() if d.reported is not None and math.isfinite(d.reported)]
    recomputed = np.array([d.recomputed_rdp for d in devices.values()]) if devices else np.zeros(0)
    diffs = [abs(d.reported - d.recomputed_rdp) / max(d.recomputed_rdp, 1e-12)
             for d in devices.values() if d.reported is not None and math.isfinite(d.reported) and d.recomputed_rdp > 0]
    worst = max(devices.values(), key=lambda d: d.recomputed_rdp, default=None)
    errors = [f for f in flags if f.severity == "error"]
    return {
        "verdict": "fail" if errors else "pass",
        "run_dir": str(run_dir),
        "dp": config.dp,
        "devices": len(devices),
        "delta": config.delta,
        "budget": config.epsilon_budget if config.dp else None,
        "epsilon_max_reported": max(reported) if reported else 0.0,
        "epsilon_max_recomputed": float(recomputed.max()) if len(recomputed) else 0.0,
        "epsilon_max_recomputed_pld": max((d.recomputed_pld for d in devices.values()), default=0.0),
        "epsilon_max_charged": max((d.charged_rdp for d in devices.values()), default=0.0),
        "epsilon_percentiles_recomputed": {f"p{p}": float(np.percentile(recomputed, p)) if len(recomputed) else 0.0
                                           for p in (50, 90, 99)},
        "max_relative_diff": max(diffs, default=0.0),
        "tolerance": tolerance,
        "over_budget": sorted(f.device for f in flags if f.code == "over_budget"),
        "within_budget": int(sum(d.recomputed_rdp <= config.epsilon_budget * (1 + tolerance)
                                 for d in devices.values())),
        "rounds_joined": {"max": max((len(d.rounds) for d in devices.values()), default=0),
                          "median": float(np.median([len(d.rounds) for d in devices.values()])) if devices else 0.0},
        "worst_device": None if worst is None else {"device": worst.device, "trajectory": worst.trajectory},
        "accountants": {"compared": "dp-accounting RDP, Opacus orders 1.1-63, conversion of Balle et al. 2020",
                        "reference": "dp-accounting PLD (tighter)"},
        "assumptions": {"neighbouring": NEIGHBOURING, "sampling": SAMPLING, "not_covered": NOT_COVERED},
        "flags": [asdict(f) for f in flags],
        "per_device": {d.device: {"rounds": d.rounds, "reported": _json_number(d.reported),
                                  "recomputed_rdp": d.recomputed_rdp, "recomputed_pld": d.recomputed_pld,
                                  "charged_rdp": d.charged_rdp} for d in sorted(devices.values(),
                                                                                        key=lambda a: a.device)},
    }


def _json_number(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None

"""Independent audit of a run's privacy claims, from its run directory alone (no device data or code).

1. read config.json and the ledger (a line torn by a crash ends it, and is reported);
2. re-derive from every round's *plan* (not from what the server summarised) the DP steps it
   asked of each device, and check the plan against the run's config;
3. per device, compose the steps of every release the server received from it (training rounds,
   popularity report, evaluation releases) and recompute epsilon with Google's dp-accounting: RDP
   at the same orders and conversion as the devices (the comparison), and PLD (a tighter
   reference) - an accountant the devices did not use;
4. in the secure modes, three figures per device, one per threat (THREATS): honest but curious,
   malicious with c colluders (the headline, on which budgets are enforced) and own share
   (enrolment subverted), at the record level and, in the user mode, the user level; each
   release is accounted with the (t, c) the DEVICE says it accounted with (the ledger's
   secure_sum_seen), not the t_min the server wrote, and any difference between the two is an
   error (either direction);
5. charge, on top, in every figure, everything a device may have released unseen: replies the
   server rejected, devices that failed (their reply may have been lost after they trained), and
   every device asked in a round that was written ahead but never completed (the server stopped
   mid-round), at the worst (t, c) it could have accounted with (its own report, else the ledger's
   or any other device's of that sum; unverified when no device reported one);
6. flag any device whose reported figure is below what it released (tampering) or above all it
   could have been charged, any device over its budget, and any round whose parameters differ
   from the config;
7. the same for user-level (central) DP when the run used it, under each sampling assumption;
8. name every figure by its unit and threat (server/audit_figures.py figure_table), and add the
   empirical attacks of RUN/audit-attacks.json when there are some, and the versions the run and
   the audit ran with (provenance).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedrec.shared.config import AUTO, SECURE_MODES, ConfigError, RunConfig
from fedrec.shared.distributed_dp import distributed_entries
from fedrec.shared.provenance import versions

from .audit_figures import ATTACKS_FILE, assumptions, figure_table, read_attacks
from .audit_head import head_flags
from .records import CONFIG, LEDGER, RunRecords

# The devices' accountant uses Opacus's orders; the audit evaluates RDP at the same ones.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
PLD_DISCRETIZATION = 1e-4
DEFAULT_TOLERANCE = 1e-3  # relative; dp-accounting's and Opacus's RDP code differ by ~1e-5 here

Step = tuple[float, float, int]  # (noise multiplier, sampling rate, steps), as in the devices' history


@dataclass
class Flag:
    severity: str  # "error" fails the audit, "warning" and "info" do not
    code: str
    message: str
    device: str | None = None
    round: int | None = None


# The three figures a device states in the secure modes, one line each for the threat it holds against (the same
# lines as server/summary.py's). All three are equal in the local mode.
THREATS = {
    "honest": "the server follows the protocol",
    "malicious": "the server deviates arbitrarily and colludes with at most c devices, but cannot enrol identities",
    "own_share": "the server also controls enrolment: only the device's own noise share protects it",
}
FIGURES = tuple(THREATS)  # (honest, malicious, own_share): the order of shared.distributed_dp.distributed_entries
HEADLINE = "malicious"  # the figure devices state as their epsilon, and on which their budget is enforced
FIGURE_NAMES = {"honest": "honest but curious", "malicious": "malicious with c colluders (the headline)",
                "own_share": "own share (enrolment subverted)"}
REPORTED_KEYS = {"malicious": "epsilon_reported", "honest": "epsilon_honest_reported",
                 "own_share": "epsilon_subverted_reported"}  # the ledger's done-line keys of each figure
_CODE_PREFIX = {"malicious": "epsilon", "honest": "honest_epsilon", "own_share": "subverted_epsilon"}
UNIT_NAMES = {"record": "record_level", "user": "user_level"}
OWN_SHARE_WARNING = 10.0  # a plain-words warning where the own-share figure passes this multiple of the budget
INFINITE: list[Step] = [(0.0, 1.0, 1)]  # a release nothing can be claimed for (epsilon inf)

SecureSum = tuple[int, int]  # (t, c): the fewest shares in a decryptable sum, the colluders assumed
Key = tuple[str, str]  # (unit, figure): unit 'record' or 'user', figure one of FIGURES


@dataclass
class DeviceAudit:
    device: str
    rounds: list[int] = field(default_factory=list)  # rounds it released something in
    # (unit, figure) -> the history of the releases the server received from it / may have received unseen
    # (rejected, failed, or asked in an unfinished round)
    steps: dict[Key, list[Step]] = field(default_factory=lambda: defaultdict(list))
    unseen: dict[Key, list[Step]] = field(default_factory=lambda: defaultdict(list))
    reported: float | None = None  # latest headline epsilon it reported, any unit (inf: it released without DP)
    reports: dict[Key, float] = field(default_factory=dict)  # latest report of each figure at each unit
    recomputed: dict[Key, float] = field(default_factory=dict)  # over `steps`: what the server received
    charged: dict[Key, float] = field(default_factory=dict)  # over steps + unseen: the most it can have spent
    recomputed_pld: float = 0.0  # the headline at the reported unit, PLD
    rdp: dict[Key, float] = field(default_factory=dict)  # over `steps`, RDP: shown beside the device's accountant
    diffs: list[float] = field(default_factory=list)  # relative differences of its reports from the recomputed
    sums: list[dict[str, Any]] = field(default_factory=list)  # the (t, c) each secure release was accounted with
    trajectory: list[tuple[int, float]] = field(default_factory=list)  # (round, recomputed headline after it)
    unit: str = "record"  # the unit it reports its headline in (the run's mode)

    @property
    def recomputed_rdp(self) -> float:
        return self.recomputed.get((self.unit, HEADLINE), 0.0)

    @property
    def charged_rdp(self) -> float:
        return self.charged.get((self.unit, HEADLINE), 0.0)

    @property
    def recomputed_subverted(self) -> float:
        return self.recomputed.get((self.unit, "own_share"), 0.0)


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


def release_figures(entry: dict[str, Any], secure_sum: SecureSum | None, unit: str = "record",
                    ) -> dict[str, list[Step]]:
    """The history one release of a round adds to a device, per figure (FIGURES), at `unit` ('record' or 'user').

    Local mode: the noise itself, the same for every figure. Distributed and user modes: the item release goes into
    a secure sum of at least t shares, c of which may be colluders', accounted by the quantised Skellam bound
    (fedrec.shared.distributed_dp, checked against the exact divergence in its tests): each device's share is
    1 / (t - c) of the sum's variance, so honest t / (t - c), malicious the full noise, own share 1 / (t - c).
    `secure_sum`: the (t, c) the release was accounted with (None in a secure round: unknown, epsilon inf). At the
    record level a user-mode release has twice the sensitivity (a record changed inside a device moves its clipped
    update by up to 2S); at the user level only user-mode releases and bounded evaluation releases count.
    """
    noise = plan_noise(entry)
    mode = entry["plan"].get("privacy", "local")
    if unit == "user" and noise and mode not in SECURE_MODES and entry.get("kind") != "evaluate":
        return dict.fromkeys(FIGURES, INFINITE)  # no user-level guarantee for a record-level release
    if not noise or mode not in SECURE_MODES:
        return dict.fromkeys(FIGURES, noise)
    if secure_sum is None or not _valid_sum(secure_sum):
        return dict.fromkeys(FIGURES, INFINITE)  # no threshold known: nothing can be claimed
    t, c = secure_sum
    factor = 2.0 if mode == "user" and unit == "record" else 1.0
    entries = distributed_entries(noise[0][0], t, c, sensitivity_factor=factor)
    local = noise[1:] if mode == "distributed" else []  # the user-row steps: local noise, never sent
    return {name: [tuple(step), *local] for name, step in zip(FIGURES, entries)}  # type: ignore[misc]


def _valid_sum(secure_sum: Any) -> bool:
    return isinstance(secure_sum, tuple) and len(secure_sum) == 2 and \
        all(isinstance(v, int) and not isinstance(v, bool) for v in secure_sum) and \
        secure_sum[0] >= 1 and 0 <= secure_sum[1] < secure_sum[0]


def _worst(options: list[dict[str, list[Step]]]) -> dict[str, list[Step]]:
    """Per figure, the option that charges the most. Options differ only in the sum's step, one Gaussian release at
    q = 1 placed first: the smallest noise multiplier is the largest epsilon at every order."""
    return {name: min((option[name] for option in options), key=lambda steps: steps[0][0] if steps else math.inf)
            for name in FIGURES}


def _as_sum(value: Any) -> SecureSum | None:
    """A (t, c) from the ledger ([t, c] or {'t_min', 'colluders'}), or None if it is not one."""
    if isinstance(value, dict):
        value = (value.get("t_min"), value.get("colluders", 0))
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    try:
        t, c = (int(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (t, c) if all(float(v) == int(v) for v in value) else None


@dataclass
class SumView:
    """One attempt's secure sum: the (t, c) the ledger wrote ahead and the (t, c) each device says it accounted
    with."""

    secure: bool  # the round released into a secure sum
    ledger: SecureSum | None  # None: the ledger records no threshold
    seen: dict[str, SecureSum | None] = field(default_factory=dict)  # device -> its report (None: malformed)

    def options(self, device: str) -> tuple[list[SecureSum | None], str]:
        """The (t, c) a device may have accounted with, and whose word that is ('device' or 'ledger')."""
        if not self.secure:
            return [None], "none"
        if device in self.seen:
            return [self.seen[device]], "device"
        others = sorted({tc for tc in self.seen.values() if tc is not None and tc != self.ledger})
        return [self.ledger, *others], "ledger"


def secure_sum_view(sent: dict[str, Any], done: dict[str, Any] | None) -> tuple[SumView, list[Flag]]:
    """The attempt's SumView, with the flags of its ledger lines: a write-ahead (t, c) the outcome line contradicts,
    a secure round without a threshold, and every device whose (t, c) differs from the ledger's (either way)."""
    kind, rnd = sent.get("kind", "train"), sent.get("round")
    secure = sent["plan"].get("privacy") in SECURE_MODES and bool(plan_noise(sent))
    flags: list[Flag] = []
    recorded = (done or {}).get("secure_sum")
    ledger = _as_sum((sent["t_min"], sent.get("colluders", 0))) if sent.get("t_min") else None
    if recorded is not None and recorded.get("t_min"):
        outcome = _as_sum(recorded)
        if ledger is None:
            ledger = outcome
        elif outcome != ledger:
            flags.append(Flag("error", "ledger_lines_disagree",
                              f"{kind} round {rnd}: the outcome line's secure sum (t_min = {recorded.get('t_min')}, "
                              f"colluders = {recorded.get('colluders', 0)}) differs from the one written ahead "
                              f"(t_min = {ledger[0]}, colluders = {ledger[1]})", round=rnd))
    if secure and ledger is None:
        flags.append(Flag("error", "secure_sum_unrecorded", f"{kind} round {rnd}: a secure-sum release whose ledger "
                          "lines record no threshold t_min", round=rnd))
    elif secure and not _valid_sum(ledger):
        flags.append(Flag("error", "secure_sum_invalid", f"{kind} round {rnd}: the ledger's secure sum {ledger} is not "
                          "a threshold t >= 1 with 0 <= colluders < t", round=rnd))
    view = SumView(secure, ledger)
    for device, value in ((done or {}).get("secure_sum_seen") or {}).items():
        tc = _as_sum(value)
        view.seen[device] = tc if _valid_sum(tc) else None
        if not _valid_sum(tc):
            flags.append(Flag("error", "secure_sum_invalid", f"{kind} round {rnd}: {device} reports a secure sum "
                              f"{value!r}, not a threshold t >= 1 with 0 <= c < t", device=device, round=rnd))
        elif not secure:
            flags.append(Flag("error", "secure_sum_mismatch", f"{kind} round {rnd}: {device} accounted a release into "
                              f"a secure sum (t = {tc[0]}, c = {tc[1]}) that the ledger does not record",
                              device=device, round=rnd))
        elif tc != ledger:
            said = "no threshold" if ledger is None else f"t_min = {ledger[0]}, colluders = {ledger[1]}"
            flags.append(Flag("error", "secure_sum_mismatch", f"{kind} round {rnd}: {device} accounted its release "
                              f"with t = {tc[0]}, c = {tc[1]}; the ledger says {said}", device=device, round=rnd))
    return view, flags


def _compact(steps: Iterable[Step]) -> tuple[Step, ...]:
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, n in steps:
        merged[(sigma, q)] = merged.get((sigma, q), 0) + int(n)
    return tuple(sorted((s, q, n) for (s, q), n in merged.items() if n > 0))


def _event(sigma: float, q: float) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    return gaussian if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)


@lru_cache(maxsize=65536)
def rdp_epsilon(steps: tuple[Step, ...], delta: float) -> float:
    if not steps:
        return 0.0
    accountant = RdpAccountant(orders=list(RDP_ORDERS))
    for sigma, q, n in steps:
        accountant.compose(_event(sigma, q), n)
    return float(accountant.get_epsilon(delta))


def exact_gaussian(config: RunConfig, unit: str) -> bool:
    """Whether devices account this unit's releases exactly (local mode at the record level: every release a plain
    Gaussian mechanism, shared/privacy/accounting.py gaussian_epsilon) rather than with RDP alone."""
    return unit == "record" and config.privacy not in SECURE_MODES


def device_epsilon(steps: tuple[Step, ...], delta: float, exact: bool) -> float:
    """The device's accountant, recomputed independently with dp-accounting: RDP, and where `exact` and every step
    has q = 1 the lower of RDP and the PLD of the Gaussian composition (PLD discretises pessimistically, so it lies
    at or just above the exact figure a device states; the tolerance covers the difference)."""
    rdp = rdp_epsilon(steps, delta)
    if exact and steps and all(q >= 1.0 for _, q, _ in steps) and math.isfinite(rdp):
        return min(rdp, pld_epsilon(steps, delta))
    return rdp


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
    reported_unit = "user" if config.privacy == "user" else "record"
    units = ("record", "user") if config.privacy == "user" else ("record",)
    devices: dict[str, DeviceAudit] = {}
    sigma: dict[str, float] = {}
    seen_rounds: set[tuple[str, int]] = set()
    asked_before: dict[tuple[str, int], set[str]] = {}  # devices asked in earlier attempts of each round
    violations: dict[tuple[str, str], Flag] = {}  # (device, code) -> its latest mis-report
    sums_used: set[SecureSum] = set()

    def device_audit(device: str) -> DeviceAudit:
        return devices.setdefault(device, DeviceAudit(device, unit=reported_unit))

    def charge(device: str, sent: dict[str, Any], view: SumView, *, received: bool) -> str:
        """Add one release to a device's figures at every unit; returns whose (t, c) it was accounted with."""
        audit = device_audit(device)
        options, source = view.options(device)
        for unit in units:
            figures = _worst([release_figures(sent, tc, unit) for tc in options])
            for name, steps in figures.items():
                (audit.steps if received else audit.unseen)[(unit, name)].extend(steps)
        if view.secure:
            used = [tc for tc in options if tc is not None]
            sums_used.update(used)
            audit.sums.append({"kind": sent.get("kind", "train"), "round": int(sent["round"]),
                               "attempt": int(sent.get("attempt", 0)), "received": received, "source": source,
                               "t": [tc[0] for tc in used], "c": [tc[1] for tc in used]})
        return source

    for sent, done in attempts(entries):
        rnd, kind = int(sent["round"]), sent.get("kind", "train")
        asked_now = set(sent.get("asked", []))
        if (kind, rnd) in seen_rounds and asked_now & asked_before.get((kind, rnd), set()):
            # (a secure popularity round is several sums over disjoint groups, one attempt each: not a repeat)
            flags.append(Flag("info", "round_repeated", f"{kind} round {rnd} was started again (a resumed run re-ran "
                                                        "it); devices are charged for every attempt", round=rnd))
        seen_rounds.add((kind, rnd))
        asked_before.setdefault((kind, rnd), set()).update(asked_now)
        flags.extend(check_plan(sent, config, sigma))
        if done is not None and done is not sent and \
                (done.get("plan"), done.get("privacy_steps")) != (sent.get("plan"), sent.get("privacy_steps")):
            flags.append(Flag("error", "ledger_lines_disagree", f"{kind} round {rnd}: the outcome line's plan differs "
                                                                "from the plan written ahead of sending", round=rnd))
        view, sum_flags = secure_sum_view(sent, done)
        flags.extend(sum_flags)
        if done is None:
            flags.append(Flag("info", "round_unfinished", f"{kind} round {rnd} was sent but never completed (the "
                                                          "server stopped); every device asked is charged for it",
                              round=rnd))
            for device in sent.get("asked", []):
                charge(device, sent, view, received=False)
            if view.secure and sent.get("asked"):
                flags.append(_unverified(kind, rnd, view, "it never completed"))
            continue
        reported = done.get("epsilon_reported", {})
        trained = list(done.get("trained", []))
        for device in trained:
            audit = device_audit(device)
            audit.rounds.append(rnd)
            if charge(device, sent, view, received=True) == "ledger" and view.seen:
                flags.append(Flag("warning", "secure_sum_not_reported", f"{kind} round {rnd}: {device} released into "
                                  "the secure sum without naming the t and c it accounted with; charged at the "
                                  "worst of the ledger's and the other devices'", device=device, round=rnd))
            audit.trajectory.append((rnd, device_epsilon(_compact(audit.steps[(reported_unit, HEADLINE)]),
                                                         config.delta, exact_gaussian(config, reported_unit))))
            if device not in reported and config.dp:
                flags.append(Flag("error", "epsilon_not_reported", f"round {rnd}: {device} released an update but "
                                                                   "reported no epsilon", device=device, round=rnd))
        unseen = [*done.get("rejected", {}), *done.get("failed", {})]
        for device in unseen:
            charge(device, sent, view, received=False)
        if view.secure and not view.seen and (trained or unseen):
            flags.append(_unverified(kind, rnd, view, "no device reported the t and c it accounted with"))
        # the unit the device reported this release at: a 'user' plan's, or an evaluation release's own unit
        user_plan = sent["plan"].get("privacy") == "user" or sent["plan"].get("unit") == "user"
        unit = "user" if user_plan and "user" in units else "record"
        for device, eps in reported.items():
            device_audit(device).reported = math.inf if eps is None else float(eps)
        for name, key in REPORTED_KEYS.items():
            for device, eps in (done.get(key) or {}).items():
                value = math.inf if eps is None else float(eps)
                audit = device_audit(device)
                audit.reports[(unit, name)] = value
                _check_report(audit, unit, name, value, rnd, config, tolerance, violations)
    flags.extend(violations.values())
    for audit in devices.values():
        for key in {*audit.steps, *audit.unseen}:
            exact = exact_gaussian(config, key[0])
            audit.recomputed[key] = device_epsilon(_compact(audit.steps[key]), config.delta, exact)
            audit.charged[key] = device_epsilon(_compact([*audit.steps[key], *audit.unseen[key]]), config.delta, exact)
            audit.rdp[key] = rdp_epsilon(_compact(audit.steps[key]), config.delta)
        audit.recomputed_pld = pld_epsilon(_compact(audit.steps[(reported_unit, HEADLINE)]), config.delta)
        flags.extend(_device_flags(audit, config, tolerance))
    flags.extend(_own_share_flags(devices, config))
    user_level, user_flags = audit_user_level(entries, config, run_dir, tolerance)
    head, head_checks = head_flags(entries, config, run_dir)
    attacks, attacks_problem = read_attacks(run_dir)
    if attacks_problem:
        flags.append(Flag("warning", "attacks_unreadable", f"{attacks_problem}; the attacks are left out of the "
                          f"report (rerun `fedrec audit {run_dir} --attacks` to write {ATTACKS_FILE} again)"))
    result = _verdict(config, devices, flags + user_flags + head_checks, tolerance, run_dir, units)
    result["trained_head"] = head
    if user_level is not None:
        result["user_level"] = user_level
    accountant_of = {unit: "exact-gaussian" if exact_gaussian(config, unit) else "rdp" for unit in units}
    result["figure_table"] = figure_table(config, devices, units, headline=HEADLINE, accountant_of=accountant_of,
                                          user_level=user_level)
    if attacks is not None:
        result["attacks"] = attacks
    result["provenance"] = {"audit": versions(), "run": run_provenance(entries, run_dir)}
    if config.privacy in SECURE_MODES:
        figures = result["figures"][UNIT_NAMES[reported_unit]]
        result["secure_aggregation"] = {
            "unit": "user level" if config.privacy == "user" else "record level",
            "headline": HEADLINE,
            "threats": dict(THREATS),
            "epsilon_max_honest_recomputed": figures["honest"]["epsilon_max_recomputed"],
            "epsilon_max_malicious_recomputed": figures["malicious"]["epsilon_max_recomputed"],
            "epsilon_max_subverted_recomputed": figures["own_share"]["epsilon_max_recomputed"],
            "epsilon_max_honest_charged": figures["honest"]["epsilon_max_charged"],
            "epsilon_max_malicious_charged": figures["malicious"]["epsilon_max_charged"],
            "epsilon_max_subverted_charged": figures["own_share"]["epsilon_max_charged"],
            "t_min": [min(t for t, _ in sums_used), max(t for t, _ in sums_used)] if sums_used else None,
            "colluders": [min(c for _, c in sums_used), max(c for _, c in sums_used)] if sums_used else None,
            "mismatches": sum(f.code == "secure_sum_mismatch" for f in flags),
            "unverified_rounds": sum(f.code == "secure_sum_unverified" for f in flags),
            "note": "three figures per device, each release accounted with the (t, c) the device says it used: "
                    "honest (t / (t - c) of the sum's noise variance), malicious with c colluders (the full "
                    "noise: the headline, on which budgets are enforced) and own share (1 / (t - c)); '_recomputed' "
                    "counts what the server received, '_charged' adds what it may have received unseen (rejected, "
                    "failed and unfinished releases)"}
    return result


# The accountants figure_table names (the device's, and RDP beside it where that is another).
ACCOUNTANT_NAMES = {"rdp": "dp-accounting RDP at the devices' orders",
                    "exact-gaussian": "the exact composition of Gaussian mechanisms where every release has q = 1 "
                                      "(dp-accounting PLD, at most RDP), else RDP: the local mode's device accountant"}


def run_provenance(entries: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    """The versions the run's code recorded: in the first ledger line of each server process (a resume starts
    another) and in summary.json."""
    sessions = [{"round": entry.get("round"), "kind": entry.get("kind"), "versions": entry["provenance"]}
                for entry in entries if isinstance(entry.get("provenance"), dict)]
    summary_path = Path(run_dir) / "summary.json"
    summary = None
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8")).get("provenance")
        except (OSError, json.JSONDecodeError, AttributeError):
            summary = None
    return {"ledger": sessions, "summary": summary}


def _unverified(kind: str, rnd: int, view: SumView, why: str) -> Flag:
    said = "no threshold" if view.ledger is None else f"t_min = {view.ledger[0]}, colluders = {view.ledger[1]}"
    return Flag("warning", "secure_sum_unverified", f"{kind} round {rnd}: {why}; its releases are charged at the "
                f"ledger's {said}, which no device confirmed", round=rnd)


def _check_report(audit: DeviceAudit, unit: str, name: str, value: float, rnd: int, config: RunConfig,
                  tolerance: float, violations: dict[tuple[str, str], Flag]) -> None:
    """A device's cumulative figure, as it reported it in round `rnd`, against what the ledger implies at that point:
    at least what the server received from it, at most all it could have been charged."""
    if not config.dp:
        return
    what = "" if name == HEADLINE else f" {FIGURE_NAMES[name]}"
    level = "" if unit == audit.unit else f" at the {unit} level"
    exact = exact_gaussian(config, unit)
    recomputed = device_epsilon(_compact(audit.steps[(unit, name)]), config.delta, exact)
    if math.isfinite(value) and math.isfinite(recomputed) and recomputed > 0:
        audit.diffs.append(abs(value - recomputed) / recomputed)
    if value < recomputed * (1 - tolerance) - 1e-12:
        code = f"{_CODE_PREFIX[name]}_under_reported"
        violations[(audit.device, code)] = Flag(
            "error", code, f"{audit.device} reported{what} epsilon {value:.6g}{level} in round {rnd}, what the server "
            f"received from it implies {recomputed:.6g}", device=audit.device, round=rnd)
    elif value > recomputed * (1 + tolerance) + 1e-12:
        charged = rdp_epsilon(_compact([*audit.steps[(unit, name)], *audit.unseen[(unit, name)]]), config.delta)
        # (RDP here: a device whose state predates exact accounting, or saw a secure sum, reports RDP)
        if value > charged * (1 + tolerance) + 1e-12:
            code = f"{_CODE_PREFIX[name]}_over_reported"
            violations[(audit.device, code)] = Flag(
                "error", code, f"{audit.device} reported{what} epsilon {value:.6g}{level} in round {rnd}, more than "
                f"all it could have been charged ({charged:.6g}): the ledger misses releases", device=audit.device,
                round=rnd)


def _device_flags(audit: DeviceAudit, config: RunConfig, tolerance: float) -> list[Flag]:
    """Budget checks on the headline figure at the unit the run's mode reports (the figure devices enforce)."""
    if not config.dp:
        return []
    flags = []
    recomputed, charged = audit.recomputed_rdp, audit.charged_rdp
    if recomputed > config.epsilon_budget * (1 + tolerance):
        flags.append(Flag("error", "over_budget", f"{audit.device}: recomputed epsilon {recomputed:.6g} exceeds the "
                          f"budget {config.epsilon_budget}", device=audit.device))
    elif charged > config.epsilon_budget * (1 + tolerance):
        flags.append(Flag("warning", "may_be_over_budget", f"{audit.device}: charged with every release it may have "
                          f"made unseen, epsilon {charged:.6g} exceeds the budget {config.epsilon_budget}",
                          device=audit.device))
    return flags


def _own_share_flags(devices: dict[str, DeviceAudit], config: RunConfig) -> list[Flag]:
    """One plain-words warning where devices' own-share figure passes OWN_SHARE_WARNING x the budget."""
    if not config.dp or config.privacy not in SECURE_MODES:
        return []
    limit = OWN_SHARE_WARNING * config.epsilon_budget
    far = [a for a in devices.values() if a.charged.get((a.unit, "own_share"), 0.0) > limit]
    if not far:
        return []
    worst = max(a.charged[(a.unit, "own_share")] for a in far)
    return [Flag("warning", "own_share_far_above_budget", f"{len(far)} device(s) have an own-share epsilon above "
                 f"{OWN_SHARE_WARNING:g} x the budget (up to {worst:.4g}): a server that can also enrol identities "
                 "(invent the other members of a sum) could learn almost as much as without noise")]


def _figure_block(devices: dict[str, DeviceAudit], unit: str, reported_unit: str,
                  budget: float | None) -> dict[str, Any]:
    """The three figures at one unit, over devices: the threat each holds against and its maxima."""
    block: dict[str, Any] = {}
    for name in FIGURES:
        key = (unit, name)
        reported = [a.reports[key] for a in devices.values() if key in a.reports]
        block[name] = {
            "name": FIGURE_NAMES[name], "threat": THREATS[name],
            "epsilon_max_reported": _json_number(max(reported)) if reported else None,
            "epsilon_max_recomputed": _json_number(max((a.recomputed.get(key, 0.0) for a in devices.values()),
                                                       default=0.0)),
            "epsilon_max_charged": _json_number(max((a.charged.get(key, 0.0) for a in devices.values()),
                                                    default=0.0)),
            "budget": budget if name == HEADLINE and unit == reported_unit else None}
    return block


def _verdict(config: RunConfig, devices: dict[str, DeviceAudit], flags: list[Flag], tolerance: float,
             run_dir: Path, units: Sequence[str] = ("record",)) -> dict[str, Any]:
    reported = [d.reported for d in devices.values() if d.reported is not None and math.isfinite(d.reported)]
    recomputed = np.array([d.recomputed_rdp for d in devices.values()]) if devices else np.zeros(0)
    diffs = [diff for d in devices.values() for diff in d.diffs]
    worst = max(devices.values(), key=lambda d: d.recomputed_rdp, default=None)
    errors = [f for f in flags if f.severity == "error"]
    reported_unit = "user" if config.privacy == "user" else "record"
    budget = config.epsilon_budget if config.dp else None
    return {
        "verdict": "fail" if errors else "pass",
        "run_dir": str(run_dir),
        "dp": config.dp,
        "devices": len(devices),
        "delta": config.delta,
        "budget": budget,
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
        "threats": dict(THREATS),
        "figures": {"headline": HEADLINE, "unit": UNIT_NAMES[reported_unit],
                    **{UNIT_NAMES[unit]: _figure_block(devices, unit, reported_unit, budget) for unit in units}},
        "accountants": {"compared": "dp-accounting RDP, Opacus orders 1.1-63, conversion of Balle et al. 2020",
                        "reference": "dp-accounting PLD (tighter)", **ACCOUNTANT_NAMES},
        "assumptions": assumptions(config),
        "flags": [asdict(f) for f in flags],
        "per_device": {d.device: _device_row(d, units) for d in sorted(devices.values(), key=lambda a: a.device)},
    }


def _device_row(audit: DeviceAudit, units: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"rounds": audit.rounds, "reported": _json_number(audit.reported),
                           "recomputed_rdp": audit.recomputed_rdp, "recomputed_pld": audit.recomputed_pld,
                           "charged_rdp": audit.charged_rdp}
    row["figures"] = {UNIT_NAMES[unit]: {name: {"reported": _json_number(audit.reports.get((unit, name))),
                                                "recomputed": _json_number(audit.recomputed.get((unit, name), 0.0)),
                                                "charged": _json_number(audit.charged.get((unit, name), 0.0))}
                                         for name in FIGURES} for unit in units}
    if audit.sums:
        row["secure_sums"] = audit.sums
    return row


def _json_number(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None

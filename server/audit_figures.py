"""What the audit's figures mean: each named by its unit and threat, the relations behind them, the attacks file."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedrec.shared.config import SECURE_MODES, RunConfig

ATTACKS_FILE = "audit-attacks.json"  # written next to the run by `fedrec audit RUN --attacks`
BOUND_KINDS = ("lower bound", "estimate", "none")
BOUND_SENTENCE = "A lower bound means the true epsilon is at least this; 0 means the attack found no evidence."

UNIT_LABELS = {"record_level": "record level", "user_level": "user level"}

# One line per figure on what it protects against. In local mode each device noises what it sends itself, so its
# one figure holds whatever the server does; the secure modes state three (server/audit.py THREATS).
PROTECTS = {
    "local": "any server, however it deviates or colludes: the device adds the full noise to what it sends",
    "honest": "a curious server that follows the protocol: it sees only decrypted sums of at least t devices",
    "malicious": "a server that deviates from the protocol and colludes with up to c devices, but cannot enrol "
                 "identities: a decryptable sum still holds t - c honest noise shares",
    "own_share": "a server that also controls enrolment (it invents the other members of a sum): only the device's "
                 "own noise share is left",
    "central": "whoever sees only the noised model (other devices, its users); not the server, which adds the "
               "noise itself and sees each device's clipped update in the clear (central DP: a trusted server)",
}
FIGURE_LABELS = {"local": "device-side noise", "honest": "honest but curious server",
                 "malicious": "malicious server with c colluders", "own_share": "own share (aggregation subverted)",
                 "central": "central DP (trusted server)"}

RECORD_RELATION = (
    "Record level, per device: two behaviour logs of the same device are neighbours if one has one (device, item) "
    "pair more, with all its events (repeats of an item are merged before training). A device's record-level "
    "epsilon bounds what everything it ever sent - its popularity report, its item updates and its evaluation "
    "releases - reveals about any such pair; one extra event on an item it already has is covered as a group of two "
    "pairs.")
RECORD_IN_USER_MODE = (
    " In user mode every release also counts at this level, with twice the sensitivity (one record changed moves "
    "the update clipped to S by up to 2S). The budget is enforced at the user level, so this figure may pass it.")
USER_RELATION = (
    "User level, per device: two behaviour logs of the same device are neighbours whatever they hold (one device's "
    "whole log replaced). A device's user-level epsilon bounds what everything it sent - its item update, clipped to "
    "S as a whole, its popularity report, scaled into the unit ball, and its evaluation releases, bounded whatever "
    "its data - reveals about its whole log. It is finite only while every release it made was user level.")
CENTRAL_RELATION = (
    "User level, central DP (a trusted server adds the noise): two federations are neighbours if one has one device "
    "more or less (Poisson sampling) or one device replaced (fixed-size sampling), with all its data.")
SAMPLING = {
    "local": "Within a device, each DP-SGD step samples every interaction independently with the rate q the server "
             "fixed (Poisson sampling), which is what the accounting assumes. Which devices take part in a round is "
             "chosen by the server, which therefore knows it: epsilon takes no amplification from device sampling.",
    "distributed": "Each release is one clipped step accounted at q = 1: no amplification from the device's record "
                   "sampling (the sum's noise is what protects it), nor from device sampling (the server chooses "
                   "the devices, so it knows who took part).",
    "user": "Each release is the device's whole update clipped to S, accounted at q = 1: no amplification from the "
            "server's choice of devices (the server chose the sample, so it knows who took part).",
}
NOT_COVERED = ("Not covered by the {unit} guarantee: the fact that a device takes part at all (and when it refuses "
               "or declines, which depends on its own settings and public plans only), and the time its reply takes "
               "(local training grows with its data). Evaluation releases are covered: noised on the device and "
               "charged like any release.{extra}")
NOT_COVERED_SECURE = (" The figures rest on the server decrypting only sums of at least t devices; what a server "
                      "that breaks the cryptography learns is not covered.")


class AuditedDevice(Protocol):
    """What the table reads of server/audit.py's DeviceAudit."""

    device: str
    reports: dict[tuple[str, str], float]
    recomputed: dict[tuple[str, str], float]
    charged: dict[tuple[str, str], float]
    rdp: dict[tuple[str, str], float]


def assumptions(config: RunConfig) -> dict[str, Any]:
    """The neighbouring relation of every unit the run reports, the sampling assumed, what is not covered."""
    relations = {"record_level": RECORD_RELATION + (RECORD_IN_USER_MODE if config.privacy == "user" else "")}
    if config.privacy == "user":
        relations = {"user_level": USER_RELATION, **relations}
    elif config.central_noise_multiplier:
        relations["user_level"] = CENTRAL_RELATION
    headline = "user_level" if config.privacy == "user" else "record_level"
    return {"neighbouring": relations[headline], "neighbouring_by_unit": relations,
            "sampling": SAMPLING.get(config.privacy, SAMPLING["local"]),
            "not_covered": NOT_COVERED.format(unit=UNIT_LABELS[headline].replace(" ", "-"),
                                              extra=NOT_COVERED_SECURE if config.privacy in SECURE_MODES else "")}


def figure_table(config: RunConfig, devices: Mapping[str, AuditedDevice], units: Sequence[str], *,
                 headline: str, accountant_of: Mapping[str, str], user_level: dict[str, Any] | None,
                 ) -> list[dict[str, Any]]:
    """Every figure the run states, one row each, headline first: its unit, the threat it holds against, the
    largest value over devices as reported, recomputed with the device's accountant (with RDP beside it where the
    device's accountant is another) and charged with what the server may have received unseen.

    `units`: 'record' and/or 'user'; `accountant_of`: unit -> the device's accountant's name ('rdp' or another).
    Local mode states one figure per unit (its three threats coincide), the secure modes three.
    """
    budget = config.epsilon_budget if config.dp else None
    headline_unit = "user" if config.privacy == "user" else "record"
    ordered = sorted(units, key=lambda unit: unit != headline_unit)
    names = ("malicious", "honest", "own_share") if config.privacy in SECURE_MODES else (headline,)
    rows = []
    for unit in ordered:
        unit_name = f"{unit}_level"
        for name in names:
            key = (unit, name)
            figure = name if config.privacy in SECURE_MODES else "local"
            is_headline = unit == headline_unit and name == headline
            row = _row(unit_name, figure, is_headline, budget if is_headline else None)
            reported = [a.reports[key] for a in devices.values() if key in a.reports]
            row["reported_max"] = _finite(max(reported)) if reported else None
            worst = max(devices.values(), key=lambda a: a.recomputed.get(key, 0.0), default=None)
            row["recomputed_max"] = _finite(worst.recomputed.get(key, 0.0)) if worst else 0.0
            row["worst_device"] = worst.device if worst else None
            row["charged_max"] = _finite(max((a.charged.get(key, 0.0) for a in devices.values()), default=0.0))
            row["accountant"] = accountant_of.get(unit, "rdp")
            row["by_accountant"] = {row["accountant"]: row["recomputed_max"]}
            if row["accountant"] != "rdp":  # RDP beside the device's own accountant
                row["by_accountant"]["rdp"] = _finite(max((a.rdp.get(key, 0.0) for a in devices.values()),
                                                          default=0.0))
            if unit == "record" and config.privacy == "user":
                row["note"] = "not enforced in user mode: it may pass the budget"
            rows.append(row)
    if user_level is not None and config.privacy not in SECURE_MODES:
        row = _row("user_level", "central", False, None)
        row.update(reported_max=_finite(user_level.get("epsilon_claimed")),
                   recomputed_max=_finite(user_level.get("epsilon_recomputed")), worst_device=None,
                   charged_max=None, accountant="rdp", by_accountant={"rdp": _finite(user_level.get(
                       "epsilon_recomputed"))}, note=f"the federation as a whole, {user_level.get('sampling')} "
                                                     "sampling of devices")
        rows.append(row)
    return rows


def _row(unit: str, figure: str, headline: bool, budget: float | None) -> dict[str, Any]:
    label = f"{UNIT_LABELS[unit]}, {FIGURE_LABELS[figure]}" + (" (headline)" if headline else "")
    return {"unit": unit, "figure": figure, "label": label, "protects_against": PROTECTS[figure],
            "headline": headline, "budget": budget}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def read_attacks(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """RUN/audit-attacks.json, checked: (the report, None), (None, None) where there is none, or (None, what is
    wrong with it, naming the file and field)."""
    path = Path(run_dir) / ATTACKS_FILE
    if not path.exists():
        return None, None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path}: not readable JSON ({err})"
    problem = _attacks_problem(report)
    return (None, f"{path}: {problem}") if problem else (report, None)


def _attacks_problem(report: Any) -> str | None:
    if not isinstance(report, dict) or not isinstance(report.get("federation"), dict) or \
            not isinstance(report.get("attacks"), list):
        return "expected an object with 'federation' (an object) and 'attacks' (a list)"
    for index, attack in enumerate(report["attacks"]):
        where = f"attacks[{index}]"
        if not isinstance(attack, dict):
            return f"{where}: expected an object"
        for key in ("name", "threat", "meaning"):
            if not isinstance(attack.get(key), str):
                return f"{where}.{key}: expected a string, got {attack.get(key)!r}"
        success = attack.get("success")
        if not isinstance(success, dict) or not all(_count(success.get(k)) for k in ("hits", "trials")) or \
                not isinstance(success.get("label"), str):
            return f"{where}.success: expected {{hits, trials: counts, label: text}}, got {success!r}"
        if attack.get("bound_kind") not in BOUND_KINDS:
            return f"{where}.bound_kind: expected one of {BOUND_KINDS}, got {attack.get('bound_kind')!r}"
        for key in ("bound", "max_bound"):
            value = attack.get(key)
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
                return f"{where}.{key}: expected a number or null, got {value!r}"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

"""`fedrec device status`, run on a device: its own privacy figures, budget, refusals and rounds, from its own
state (and its own policy) only."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared.state import DeviceState, FileStateStore, SlotStateStore, StateError

from .nodes import MODEL_FILE, NODE_FILE, STATE_FILE
from .state_folder import check_state_folder, read_node_file, slot_devices

POLICY_FILE = "policy.toml"  # a device's policy file kept next to its state (what `device status` reads unasked)

FIGURES = ("malicious", "honest", "own_share")
# One line each on the threat a figure holds against (shared/privacy/releases.py).
THREATS = {
    "malicious": "against a malicious server that colludes with at most c devices per sum but cannot enrol "
                 "identities (its budget is enforced on this one)",
    "honest": "against a server that follows the protocol (honest but curious)",
    "own_share": "against a server that also controls enrolment (Sybils): only this device's own noise share "
                 "protects it",
}
SUBVERTED_WARNING_FACTOR = 10.0


def status_policy(*, policy_path: Path | None = None, state_path: Path | None = None,
                  state_dir: Path | None = None) -> tuple[Any, str]:
    """(the device's PrivacyPolicy, where it came from).

    In order: an explicit policy file; for a deployed device, the policy its node.json names (policy-path, and
    policy keys, where recorded) or a policy.toml next to its state; for a simulated device, the run's own
    config.json beside its device-state folder (a simulated device's policy is the run config's); else the
    default policy, said so.
    """
    from fedrec.shared.config import ConfigError, RunConfig
    from fedrec.shared.policy import PolicyError, PrivacyPolicy, read_policy_file, simulated_policy

    try:
        if policy_path is not None:
            return PrivacyPolicy.from_mapping(read_policy_file(Path(policy_path)), source=str(policy_path)), \
                str(policy_path)
        if state_path is not None:
            node = read_node_file(state_path)
            settings: dict[str, Any] = {}
            source = []
            named = node.get("policy-path")
            if named:
                settings.update(read_policy_file(Path(str(named))))
                source.append(str(named))
            elif (state_path / POLICY_FILE).exists():
                settings.update(read_policy_file(state_path / POLICY_FILE))
                source.append(str(state_path / POLICY_FILE))
            recorded = {k: v for k, v in node.items() if k in PrivacyPolicy.keys()}
            if isinstance(node.get("policy"), dict):
                recorded.update(node["policy"])
            if recorded:
                settings.update(recorded)
                source.append(f"{state_path / NODE_FILE} (its node config's policy keys)")
            if source:
                return PrivacyPolicy.from_mapping(settings, source=" + ".join(source)), " + ".join(source)
        if state_dir is not None:
            config_file = Path(state_dir).parent / "config.json"
            if config_file.exists():
                mapping = json.loads(config_file.read_text(encoding="utf-8"))
                config = RunConfig.from_mapping(mapping, source=str(config_file))
                return simulated_policy(config), f"{config_file}, the run's device-policy"
    except (PolicyError, ConfigError, OSError, ValueError) as err:
        raise StateError(f"cannot read the device's policy: {err}") from None
    return PrivacyPolicy(), ("the default policy (no policy file found: pass --policy FILE where the device's "
                             "node config names one or sets policy keys)")


def load_device_state(*, state_path: Path | None = None, state_dir: Path | None = None,
                      device_id: str | None = None) -> tuple[DeviceState, str, str]:
    """(the state, 'deployed' or 'simulated', the file(s) it came from), read only: nothing is written."""
    if state_path is not None:
        state_path = Path(state_path)
        check_state_folder(state_path)
        node = read_node_file(state_path)
        state = FileStateStore(state_path / STATE_FILE).load()
        if state is None:  # said hello, never received a plan: nothing spent
            known = str(node.get("device-id") or "")
            if not known:
                raise StateError(f"{state_path}: no {STATE_FILE} and no device id in {NODE_FILE}")
            state = DeviceState(device_id=known)
        elif node.get("device-id") and node["device-id"] != state.device_id:
            raise StateError(f"{state_path}: {STATE_FILE} belongs to {state.device_id!r} but {NODE_FILE} names "
                             f"{node['device-id']!r}: not one device's folder")
        return state, "deployed", str(state_path / STATE_FILE)
    if state_dir is None or not device_id:
        raise StateError("give --state-path DIR (a deployed device's state folder) or --state-dir DIR --device-id "
                         "ID (a simulated device of a run's device-state folder)")
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise StateError(f"{state_dir}: no such folder; give a run's device-state folder (RUN/device-state, or "
                         "its state-dir setting)")
    if (state_dir / STATE_FILE).exists() or (state_dir / NODE_FILE).exists():
        raise StateError(f"{state_dir}: a deployed device's state folder; run `fedrec device status --state-path "
                         f"{state_dir}`")
    state = SlotStateStore(state_dir, device_id).load()
    if state is None:
        known = slot_devices(state_dir)
        shown = (", ".join(known[:5]) + (", ..." if len(known) > 5 else "")) if known else "none"
        raise StateError(f"{state_dir}: no state for device {device_id!r} (devices with a state there: {shown})")
    return state, "simulated", str(state_dir / f"{device_id}.{{0,1}}.json")


def _item_model_round(state_path: Path) -> int | None:
    try:
        with np.load(state_path / MODEL_FILE, allow_pickle=False) as data:
            return int(data["server_round"])
    except (OSError, ValueError, KeyError):
        return None


def device_status(*, state_path: Path | None = None, state_dir: Path | None = None, device_id: str | None = None,
                  policy_path: Path | None = None) -> dict[str, Any]:
    """What a device's owner can know of its privacy, from its own state (and its own policy) only."""
    from fedrec.shared.device import Device, DeviceSettings

    state, kind, source = load_device_state(state_path=state_path, state_dir=state_dir, device_id=device_id)
    policy, policy_source = status_policy(policy_path=policy_path, state_path=state_path if kind == "deployed"
                                          else None, state_dir=state_dir)

    def no_data() -> Any:
        raise AssertionError("device status never reads the device's data")

    device = Device(state.device_id, 0, no_data, FileStateStore(Path("/nonexistent")),
                    DeviceSettings(embedding_dim=1, init_scale=0.0, seed=0), policy)
    delta = policy.max_delta
    record = dict(zip(FIGURES, device.figures(state, delta, user_level=False)))
    user = dict(zip(FIGURES, device.figures(state, delta, user_level=True)))
    user_finite = not state.not_user_level and not state.non_private and bool(state.rounds)
    budget = policy.epsilon_budget
    left = {"record_level": max(0.0, budget - record["malicious"]) if math.isfinite(record["malicious"]) else 0.0}
    if user_finite:
        left["user_level"] = max(0.0, budget - user["malicious"])
    warnings = []
    if state.non_private:
        warnings.append("it once released something without differential privacy (its policy allowed it): every "
                        "epsilon is infinite from then on")
    for level, figures in (("record", record), ("user", user if user_finite else None)):
        if figures and math.isfinite(figures["own_share"]) and \
                figures["own_share"] > SUBVERTED_WARNING_FACTOR * budget:
            warnings.append(f"its own-share epsilon at the {level} level, {figures['own_share']:.3g}, is over "
                            f"{SUBVERTED_WARNING_FACTOR:.0f}x its budget: it holds only if nobody subverts "
                            "enrolment; set max-subverted-epsilon in its policy to cap it")
    refused = Counter(rule for _, rule in state.refused)
    return {
        "device_id": state.device_id, "kind": kind, "state": source, "delta": delta,
        "record_level": record, "user_level": user if user_finite else None, "threats": dict(THREATS),
        "policy": {"source": policy_source, "epsilon_budget": budget, "max_subverted_epsilon":
                   policy.max_subverted_epsilon, "enrolment_authority": policy.enrolment_authority or None},
        "budget_left": left,
        "rounds": list(state.rounds), "declined": list(state.declined),
        "refused": dict(sorted(refused.items(), key=lambda kv: (-kv[1], kv[0]))),
        "refusals": [[r, rule] for r, rule in state.refused],
        "secure_sums": [list(s) for s in state.secure_sums],
        "non_private": state.non_private,
        "item_model_round": _item_model_round(Path(state_path)) if kind == "deployed" else None,
        "warnings": warnings,
    }


def _rounds_text(rounds: list[int], limit: int = 12) -> str:
    """'1-3, 5, 8' (the latest `limit` runs of consecutive rounds)."""
    runs: list[list[int]] = []
    for r in sorted(set(rounds)):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    parts = [f"{a}-{b}" if b > a else f"{a}" for a, b in runs]
    return ("..., " if len(parts) > limit else "") + ", ".join(parts[-limit:])


def _eps(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.4g}"


def format_status(status: dict[str, Any]) -> str:
    labels = {"malicious": "headline ", "honest": "honest   ", "own_share": "own share"}
    lines = [f"device {status['device_id']} ({status['kind']}; state {status['state']})"]
    secure = bool(status["secure_sums"])
    for level in ("record", "user"):
        figures = status[f"{level}_level"]
        if figures is None:
            continue
        lines.append(f"{level}-level epsilon at delta {status['delta']:g}"
                     + ("" if secure else " (all three equal: it joined no secure sum)") + ":")
        for name in FIGURES:
            lines.append(f"  {_eps(figures[name]):>8}  {labels[name]}  {status['threats'][name]}")
    if status["user_level"] is None:
        lines.append("user-level epsilon: none finite (it made record-level releases, or none yet)")
    policy = status["policy"]
    left = status["budget_left"]
    lines.append(f"budget: {policy['epsilon_budget']:g}, from {policy['source']}; left "
                 f"{_eps(left['record_level'])} at the record level (local and distributed rounds)"
                 + (f", {_eps(left['user_level'])} at the user level (user rounds)" if "user_level" in left else ""))
    if policy["max_subverted_epsilon"]:
        lines.append(f"cap on the own-share epsilon: {policy['max_subverted_epsilon']:g}")
    rounds, declined = status["rounds"], status["declined"]
    lines.append(f"rounds joined: {len(rounds)}" + (f" ({_rounds_text(rounds)})" if rounds else ""))
    lines.append(f"declined (budget): {len(declined)}" + (f" ({_rounds_text(declined)})" if declined else ""))
    refused = status["refused"]
    lines.append(f"refused (policy): {sum(refused.values())}"
                 + (" (" + ", ".join(f"{rule}: {n}" for rule, n in refused.items()) + ")" if refused else ""))
    sums = Counter((t, c) for _, t, c in status["secure_sums"])
    lines.append(f"secure sums: {len(status['secure_sums'])}"
                 + (" (" + ", ".join(f"t={t} c={c}: {n}" for (t, c), n in sorted(sums.items())) + ")" if sums else ""))
    if status["item_model_round"] is not None:
        lines.append(f"latest item model: round {status['item_model_round']}")
    lines += [f"warning: {w}" for w in status["warnings"]]
    return "\n".join(lines)

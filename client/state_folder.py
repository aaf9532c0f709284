"""A device's state folder: what a deployed device keeps under its node config's state-path, and what is wrong
with a folder that is not one (missing, a file, a simulation's device-state folder, empty)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedrec.shared.state import StateError

from .nodes import NODE_FILE, STATE_FILE

RUN_CONFIG = "config.json"  # what a simulation's run directory holds beside its device-state folder


def slot_devices(folder: Path) -> list[str]:
    """The device ids of a simulation's state folder (SlotStateStore: <id>.0.json, <id>.1.json)."""
    ids = {p.name.rsplit(".", 2)[0] for p in folder.glob("*.[01].json")}
    return sorted(ids, key=lambda d: (len(d), d))


def check_state_folder(state_path: Path) -> None:
    """Fail with what is wrong when `state_path` is not a deployed device's state folder."""
    state_path = Path(state_path)
    if not state_path.exists():
        raise StateError(f"{state_path}: no such folder; give the device's state folder (its node config's "
                         "state-path)")
    if not state_path.is_dir():
        raise StateError(f"{state_path}: not a folder; give the device's state folder (its node config's "
                         "state-path), not a file in it")
    if (state_path / STATE_FILE).exists() or (state_path / NODE_FILE).exists():
        return
    simulated = slot_devices(state_path)
    if simulated:
        shown = ", ".join(simulated[:5]) + (", ..." if len(simulated) > 5 else "")
        raise StateError(f"{state_path}: a simulation's device-state folder ({len(simulated)} simulated devices: "
                         f"{shown}), not one deployed device's; for one of them run `fedrec device status "
                         f"--state-dir {state_path} --device-id {simulated[0]}` (simulated devices keep no item "
                         "model: the run's checkpoint has it)")
    if (state_path / RUN_CONFIG).exists() and (state_path / "device-state").is_dir():
        raise StateError(f"{state_path}: a simulation's run directory, not a deployed device's state folder; its "
                         f"simulated devices are in {state_path / 'device-state'} (fedrec device status --state-dir "
                         f"{state_path / 'device-state'} --device-id ID) and keep no item model: the run's "
                         "checkpoint has it")
    raise StateError(f"{state_path}: not a device state folder (no {STATE_FILE} or {NODE_FILE}; a deployed device "
                     "writes them under its node config's state-path once its SuperNode has received a message)")


def read_node_file(state_path: Path) -> dict[str, Any]:
    """The device's node.json (its device id, where its data is); {} where it has none yet."""
    try:
        node = json.loads((state_path / NODE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise StateError(f"{state_path / NODE_FILE}: unreadable ({err})") from None
    return node if isinstance(node, dict) else {}

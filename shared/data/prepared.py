"""A prepared data folder: the public catalogue, a manifest, and every device's events (device-sorted arrays).

A simulated device memory-maps the arrays and reads only its own slice. The folder's `server/`
subfolder is all a deployed server is given: the catalogue and a manifest with nothing per device.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError
from .catalogue import Catalogue
from .interactions import DataError, DeviceEvents, Interactions

PREPARED_FORMAT = 1
MANIFEST = "manifest.json"
CATALOGUE = "catalogue.csv"
DEVICE_IDS = "device_ids.csv"
ARRAYS = ("offsets", "items", "times", "weights")
SERVER_FOLDER = "server"
SERVER_KIND = "server"
# Everything a server manifest may say: public facts about the catalogue, nothing per device and no totals
# over the devices' data (a count of events or devices is a statistic of personal data).
SERVER_MANIFEST_KEYS = frozenset({"format", "kind", "dataset", "num_items", "num_categories"})
SERVER_FILES = frozenset({CATALOGUE, MANIFEST})


def write_prepared(out: Path, interactions: Interactions, catalogue: Catalogue, device_ids: list[str],
                   *, meta: dict[str, Any]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if catalogue.num_items != interactions.num_items or len(device_ids) != interactions.num_devices:
        raise DataError("prepared data: catalogue or device ids do not match the interactions")
    arrays = {"offsets": interactions.offsets, "items": interactions.items.astype(np.int32),
              "times": interactions.times, "weights": interactions.weights}
    for name, values in arrays.items():
        np.save(out / f"{name}.npy", values)
    catalogue.write_csv(out / CATALOGUE)
    (out / DEVICE_IDS).write_text("device_index,user_id\n" + "".join(f"{k},{u}\n" for k, u in enumerate(device_ids)),
                                  encoding="utf-8")
    manifest = {"format": PREPARED_FORMAT, "num_devices": interactions.num_devices,
                "num_items": interactions.num_items, "num_events": len(interactions), **meta}
    _write_json(out / MANIFEST, manifest)


def write_server_folder(out: Path, catalogue: Catalogue, *, dataset: str) -> Path:
    """`out` with catalogue.csv and a manifest of public catalogue facts: all a deployed server is given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    catalogue.write_csv(out / CATALOGUE)
    _write_json(out / MANIFEST, {"format": PREPARED_FORMAT, "kind": SERVER_KIND, "dataset": dataset,
                                 "num_items": catalogue.num_items,
                                 "num_categories": len(set(catalogue.categories or ()))})
    return out


def read_server_folder(path: Path) -> tuple[Catalogue, dict[str, Any]]:
    """The catalogue and manifest of a server folder, refusing anything that could hold personal data.

    The folder must hold exactly catalogue.csv and manifest.json, and the manifest only the keys of
    SERVER_MANIFEST_KEYS: a deployed server is never handed a device's events, ids or counts.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: not found; the server's data-path must be the server folder 'fedrec "
                        f"prepare' writes (DATA/{SERVER_FOLDER}: {CATALOGUE} and {MANIFEST})")
    manifest = _read_json(manifest_path)
    if manifest.get("kind") != SERVER_KIND:
        hint = (f"a prepared folder with every device's events; give the server only {path / SERVER_FOLDER}"
                if "num_devices" in manifest else "not a server folder")
        raise DataError(f"{manifest_path}: kind {manifest.get('kind')!r}, expected {SERVER_KIND!r} ({hint})")
    if manifest.get("format") != PREPARED_FORMAT:
        raise DataError(f"{manifest_path}: format {manifest.get('format')!r}, expected {PREPARED_FORMAT}")
    extra_keys = sorted(set(manifest) - SERVER_MANIFEST_KEYS)
    if extra_keys:
        raise DataError(f"{manifest_path}: keys {extra_keys} are not allowed in a server manifest (allowed: "
                        f"{sorted(SERVER_MANIFEST_KEYS)}); the server holds nothing per device")
    extra_files = sorted(p.name for p in path.iterdir() if p.name not in SERVER_FILES)
    if extra_files:
        raise DataError(f"{path}: holds {extra_files}; a server folder holds only {sorted(SERVER_FILES)} "
                        "(the server holds no personal data): move the other files out")
    catalogue = Catalogue.read_csv(path / CATALOGUE)
    if catalogue.num_items != manifest.get("num_items"):
        raise DataError(f"{manifest_path}: num_items {manifest.get('num_items')!r}, but {path / CATALOGUE} lists "
                        f"{catalogue.num_items} items")
    return catalogue, manifest


def prepared_device_count(path: Path) -> int:
    """The number of devices in a prepared folder, from its manifest alone (no event is read)."""
    manifest_path = Path(path) / MANIFEST
    manifest = _read_json(manifest_path)
    if not isinstance(manifest.get("num_devices"), int):
        raise DataError(f"{manifest_path}: num_devices {manifest.get('num_devices')!r}, expected a whole number "
                        "(is this a prepared folder, not a server folder?)")
    return int(manifest["num_devices"])


def flower_app_holding(path: Path) -> Path | None:
    """The nearest folder at or above `path` whose pyproject.toml declares a Flower app ([tool.flwr.app])."""
    here = Path(path).expanduser().resolve()
    for folder in (here, *here.parents):
        pyproject = folder / "pyproject.toml"
        try:
            doc = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
        if "app" in doc.get("tool", {}).get("flwr", {}):
            return folder
    return None


OUTPUT_FOLDER = "runs"  # the one folder inside an app fedrec writes to: git-ignored, outside pyproject's fab-include


def refuse_inside_flower_app(path: Path | str, what: str) -> None:
    """Raise if `path` lies inside a Flower app folder (other than its runs/): `flwr run` packs that folder
    into the app bundle.

    The bundle goes to the SuperLink and every SuperNode, so run records, device state or events
    written there could reach everyone; this holds for the project checkout too. `runs/` is the
    exception: ignored by git and outside the app's fab-include (tests/test_fab.py builds a bundle
    with a run in it and checks that nothing of it ships), so `fedrec simulate`'s default stays.
    """
    resolved = Path(path).expanduser().resolve()
    app = flower_app_holding(resolved)
    if app is not None and not resolved.is_relative_to(app / OUTPUT_FOLDER):
        raise ConfigError(f"{what} {resolved}: inside the Flower app folder {app} (its pyproject.toml has "
                          "[tool.flwr.app]), whose files 'flwr run' can pack into the app bundle sent to the "
                          f"SuperLink and every SuperNode; choose a folder outside {app}, or under "
                          f"{app / OUTPUT_FOLDER}")


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; is {path.parent} a folder written by 'fedrec prepare'?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class PreparedData:
    """Read side of a prepared folder; cheap to open (arrays are memory-mapped)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        self.manifest = _read_json(manifest_path)
        if self.manifest.get("format") != PREPARED_FORMAT:
            raise DataError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {PREPARED_FORMAT}")
        try:
            self._arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        except (OSError, ValueError) as err:
            hint = " (a server folder holds no events; a simulation reads the prepared folder)" \
                if self.manifest.get("kind") == SERVER_KIND else ""
            raise DataError(f"{self.path}: missing or damaged event arrays ({err}){hint}") from None
        self.num_devices = int(self.manifest["num_devices"])
        self.num_items = int(self.manifest["num_items"])
        if len(self._arrays["offsets"]) != self.num_devices + 1:
            raise DataError(f"{self.path}/offsets.npy: {len(self._arrays['offsets'])} entries for "
                            f"{self.num_devices} devices (expected devices + 1)")

    def device_events(self, k: int) -> DeviceEvents:
        if not 0 <= k < self.num_devices:
            raise IndexError(f"{self.path}: device {k} outside 0..{self.num_devices - 1}")
        lo, hi = int(self._arrays["offsets"][k]), int(self._arrays["offsets"][k + 1])
        events = DeviceEvents(items=np.asarray(self._arrays["items"][lo:hi], dtype=np.int64),
                              times=np.asarray(self._arrays["times"][lo:hi], dtype=np.int64),
                              weights=np.asarray(self._arrays["weights"][lo:hi], dtype=np.float32))
        events.check_catalogue(self.num_items, source=f"{self.path} device {k}")
        return events

    def catalogue(self) -> Catalogue:
        return Catalogue.read_csv(self.path / CATALOGUE)

    def interactions(self) -> Interactions:
        offsets = np.asarray(self._arrays["offsets"])
        users = np.repeat(np.arange(self.num_devices), np.diff(offsets))
        return Interactions(users=users.astype(np.int64), items=np.asarray(self._arrays["items"], np.int64),
                            times=np.asarray(self._arrays["times"], np.int64),
                            weights=np.asarray(self._arrays["weights"], np.float32),
                            num_devices=self.num_devices, num_items=self.num_items)

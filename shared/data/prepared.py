"""A prepared data folder: the public catalogue, a manifest, and every device's events (device-sorted arrays).

A simulated device memory-maps the arrays and reads only its own slice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .catalogue import Catalogue
from .interactions import DataError, DeviceEvents, Interactions

PREPARED_FORMAT = 1
MANIFEST = "manifest.json"
CATALOGUE = "catalogue.csv"
DEVICE_IDS = "device_ids.csv"
ARRAYS = ("offsets", "items", "times", "weights")


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
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


class PreparedData:
    """Read side of a prepared folder; cheap to open (arrays are memory-mapped)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{manifest_path}: not found; is {self.path} a folder written by 'fedrec prepare'?") from None
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{manifest_path}: unreadable ({err})") from None
        if self.manifest.get("format") != PREPARED_FORMAT:
            raise DataError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {PREPARED_FORMAT}")
        try:
            self._arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        except (OSError, ValueError) as err:
            raise DataError(f"{self.path}: missing or damaged event arrays ({err})") from None
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

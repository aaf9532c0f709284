"""From a raw behaviour log to a prepared folder: dedupe, k-core filter, index, write per-device partitions.

Every step logs what it dropped and why, with counts; the counts also go into the manifest. The
folder holds the public catalogue, one small CSV per device (that device's own events only: what
a deployed device is given), the same events as device-sorted arrays (what a simulation reads) and
server/ (the catalogue and a manifest with nothing per device: all a deployed server is given).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .catalogue import Catalogue, read_our_csv
from .interactions import MIN_EVENTS, DataError, DeviceEvents, Interactions
from .prepared import (CATALOGUE, MANIFEST, SERVER_FOLDER, refuse_inside_flower_app, write_prepared,
                       write_server_folder)

if TYPE_CHECKING:  # the raw-log readers need pandas; a device reading its own events file does not
    from .formats import RawLog

log = logging.getLogger("fedrec.data")
DEVICE_FILE_COLUMNS = ("item_index", "timestamp", "weight")


@dataclass(frozen=True)
class PrepareSettings:
    min_user_items: int = 5  # distinct items a device needs (train + validation + test)
    min_item_users: int = 1  # k-core threshold for items (1 = keep every item)
    device_files: bool = True  # also write devices/<index>.csv


def check_output_folder(out: Path, *, replace: bool = False) -> None:
    """Refuse to prepare into a folder that holds anything, unless it holds an earlier preparation and `replace`
    says to replace it whole: old and new device files must never mix (a deployment would pick up both)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    held = [name for name in ("config.json", "ledger.jsonl") if name in entries]
    if held:
        raise DataError(f"{out}: a run directory (it holds {held[0]}), never a place to prepare data: choose another "
                        "--out")
    if MANIFEST not in entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise DataError(f"{out}: not empty ({len(entries)} entries: {shown}) and not an earlier preparation; choose "
                        "an empty or new --out")
    if not replace:
        raise DataError(f"{out}: holds an earlier preparation; pass --replace to replace it whole (its device files "
                        "and arrays are removed, never mixed with the new ones), or choose another --out")


def prepare_log(raw: RawLog, out: Path, *, dataset: str, settings: PrepareSettings = PrepareSettings(),
                replace: bool = False) -> dict:
    """Turn `raw` into a prepared folder at `out`; returns the preprocessing stats (also in the manifest).

    The folder is written beside `out` and moved into place whole: `out` must be new or empty, or (with
    `replace`) an earlier preparation, which is replaced only once the new one is complete.
    """
    if settings.min_user_items < MIN_EVENTS:
        raise DataError(f"min-user-items must be at least {MIN_EVENTS} (train, validation and test item)")
    refuse_inside_flower_app(out, "prepared folder")
    check_output_folder(out, replace=replace)
    out = Path(out)
    staging = out.parent / f".{out.name}.preparing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        stats = _prepare_into(raw, staging, dataset=dataset, settings=settings)
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("prepared %d devices, %d items, %d events into %s", stats["devices"], stats["items"], stats["events"],
             out)
    return stats


def _move_into_place(staging: Path, out: Path) -> None:
    """`staging` becomes `out`; an earlier `out` is set aside first and removed only after the swap."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    if out.exists():
        out.rename(old)  # an empty folder, or an earlier preparation (check_output_folder)
    try:
        staging.rename(out)
    except OSError:
        if old.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _prepare_into(raw: RawLog, out: Path, *, dataset: str, settings: PrepareSettings) -> dict:
    stats: dict[str, Any] = {**raw.stats, "events_read": len(raw)}
    users, items, times, weights = dedupe(raw.users, raw.items, raw.times, raw.weights)
    stats["duplicates_merged"] = len(raw) - len(users)
    log.info("%s: %d events; %d repeats of a (user, item) pair merged (first time, strongest weight kept)",
             raw.source, len(raw), stats["duplicates_merged"])
    keep = k_core(users, items, min_user_items=settings.min_user_items, min_item_users=settings.min_item_users,
                  stats=stats)
    users, items, times, weights = users[keep], items[keep], times[keep], weights[keep]
    if not len(users):
        raise DataError(f"{raw.source}: no device keeps {settings.min_user_items} distinct items after filtering")
    item_codes = np.unique(items)
    item_ids = sorted((raw.item_ids[c] for c in item_codes), key=_natural_key)
    item_index = {item: i for i, item in enumerate(item_ids)}
    item_map = np.full(len(raw.item_ids), -1, dtype=np.int64)
    item_map[item_codes] = [item_index[raw.item_ids[c]] for c in item_codes]
    user_codes = np.unique(users)
    user_ids = sorted((raw.user_ids[c] for c in user_codes), key=_natural_key)
    user_index = {user: u for u, user in enumerate(user_ids)}
    user_map = np.full(len(raw.user_ids), -1, dtype=np.int64)
    user_map[user_codes] = [user_index[raw.user_ids[c]] for c in user_codes]
    interactions = Interactions.from_unsorted(user_map[users], item_map[items], times, weights,
                                              num_devices=len(user_ids), num_items=len(item_ids))
    catalogue = Catalogue(item_ids=tuple(item_ids),
                          titles=tuple(raw.item_titles.get(i, "") for i in item_ids) if raw.item_titles else None,
                          categories=tuple(raw.item_categories.get(i, "") for i in item_ids)
                          if raw.item_categories else None)
    stats.update(devices=len(user_ids), items=len(item_ids), events=len(interactions))
    out = Path(out)
    write_prepared(out, interactions, catalogue, user_ids,
                   meta={"dataset": dataset, "source": raw.source, "preprocessing": stats,
                         "device_files": "devices/<device_index>.csv" if settings.device_files else None,
                         "server_folder": SERVER_FOLDER})
    if settings.device_files:
        write_device_files(out / "devices", interactions)
    write_server_folder(out / SERVER_FOLDER, catalogue, dataset=dataset)
    return stats


def write_device_data(population: Any, out: Path) -> list[Path]:
    """What deploy-local hands its devices: out/catalogue.csv and out/devices/<k>.csv (device k's own events).

    Nothing else: no all-device arrays, no id map; the server's folder is written apart (write_server_folder).
    """
    out = Path(out)
    refuse_inside_flower_app(out, "device data folder")
    (out / "devices").mkdir(parents=True, exist_ok=True)
    population.catalogue().write_csv(out / CATALOGUE)
    files = [out / "devices" / f"{k}.csv" for k in range(population.num_devices)]
    for k, path in enumerate(files):
        write_device_file(path, population.device_events(k))
    return files


def dedupe(users: np.ndarray, items: np.ndarray, times: np.ndarray,
           weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One event per (user, item): the earliest time, the strongest weight."""
    key = users.astype(np.int64) * (int(items.max()) + 1) + items
    order = np.lexsort((times, key))
    key_sorted = key[order]
    first = np.r_[True, key_sorted[1:] != key_sorted[:-1]]
    starts = np.flatnonzero(first)
    strongest = np.maximum.reduceat(weights[order], starts) if len(starts) else weights[:0]
    pick = order[starts]
    return users[pick], items[pick], times[pick], strongest.astype(np.float32)


def k_core(users: np.ndarray, items: np.ndarray, *, min_user_items: int, min_item_users: int,
           stats: dict[str, Any]) -> np.ndarray:
    """Rows kept after alternately dropping rare items and short devices until both thresholds hold."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        item_count = np.bincount(items[keep], minlength=int(items.max()) + 1)
        rare = keep & (item_count[items] < min_item_users)
        keep &= ~rare
        user_count = np.bincount(users[keep], minlength=int(users.max()) + 1)
        short = keep & (user_count[users] < min_user_items)
        keep &= ~short
        if not (rare.any() or short.any()):
            break
    dropped_users = len(np.unique(users)) - len(np.unique(users[keep]))
    dropped_items = len(np.unique(items)) - len(np.unique(items[keep]))
    stats.update(users_dropped_short_history=dropped_users, items_dropped_rare=dropped_items,
                 events_dropped_by_filters=int((~keep).sum()))
    log.info("dropped %d devices with fewer than %d distinct items and %d items with fewer than %d devices "
             "(%d events)", dropped_users, min_user_items, dropped_items, min_item_users, int((~keep).sum()))
    return keep


def write_device_files(folder: Path, interactions: Interactions) -> None:
    """devices/<index>.csv: item_index,timestamp,weight - one device's own events, nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    offsets = interactions.offsets
    for k in range(interactions.num_devices):
        lo, hi = offsets[k], offsets[k + 1]
        write_device_file(folder / f"{k}.csv", DeviceEvents(items=interactions.items[lo:hi],
                                                            times=interactions.times[lo:hi],
                                                            weights=interactions.weights[lo:hi]))


def write_device_file(path: Path, events: DeviceEvents) -> None:
    """One device's own events as item_index,timestamp,weight rows."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(DEVICE_FILE_COLUMNS)
        writer.writerows((int(i), int(t), f"{w:g}") for i, t, w in zip(events.items, events.times, events.weights))


def read_device_file(path: Path, *, num_items: int) -> DeviceEvents:
    """A deployed device's own events, checked against the public catalogue's size."""
    path = Path(path)
    items, times, weights = [], [], []
    for line, row in read_our_csv(path, DEVICE_FILE_COLUMNS, "the device's data"):
        try:
            item, time, weight = int(row[0]), int(row[1]), float(row[2])
        except (ValueError, IndexError):
            raise DataError(f"{path}: line {line}: expected item_index,timestamp,weight numbers, got {row}") from None
        if not 0 <= item < num_items:
            raise DataError(f"{path}: line {line}: item_index {item} is outside the catalogue of {num_items} items")
        items.append(item)
        times.append(time)
        weights.append(weight)
    return DeviceEvents(items=np.asarray(items, np.int64), times=np.asarray(times, np.int64),
                        weights=np.asarray(weights, np.float32))


def _natural_key(value: str) -> tuple[int, Any]:
    return (0, int(value)) if value.lstrip("-").isdigit() else (1, value)


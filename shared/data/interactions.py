"""Containers for behaviour logs: all devices' events, one device's events, and its split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """Input data is malformed; the message names the file, row/column and the fix.

    On a device the message (which may quote the data) stays in the device's own log; the server
    gets only the code 'device-data' (client/app.py).
    """


@dataclass(frozen=True)
class DeviceEvents:
    """One device's own behaviour log: item indices into the public catalogue, times, weights."""

    items: np.ndarray  # int64 [n]
    times: np.ndarray  # int64 [n]
    weights: np.ndarray  # float32 [n]

    def __post_init__(self) -> None:
        n = len(self.items)
        if len(self.times) != n or len(self.weights) != n:
            raise DataError(f"device events: items/times/weights lengths differ ({n}, {len(self.times)}, "
                            f"{len(self.weights)})")

    def __len__(self) -> int:
        return len(self.items)

    def check_catalogue(self, num_items: int, *, source: str) -> None:
        if len(self.items) and (self.items.min() < 0 or self.items.max() >= num_items):
            bad = self.items[(self.items < 0) | (self.items >= num_items)][0]
            raise DataError(f"{source}: item index {bad} is outside the catalogue of {num_items} items "
                            "(was the data prepared with a different catalogue?)")


@dataclass(frozen=True)
class DeviceSplit:
    """Time-ordered leave-last-out split of one device's events (distinct items)."""

    train_items: np.ndarray  # int64 [n_train]
    train_weights: np.ndarray  # float32 [n_train]
    val_item: int
    test_item: int

    @property
    def seen_items(self) -> np.ndarray:
        """Every item the device has interacted with before the test item."""
        return np.append(self.train_items, self.val_item)


MIN_EVENTS = 3  # one train, one validation and one test item


def split_device(events: DeviceEvents) -> DeviceSplit | None:
    """Keep each item's first event (weight: the strongest), order by time, hold out the last two.

    The last new item is the test item and the one before it the validation item; the
    rest is training data. Returns None when fewer than MIN_EVENTS distinct items remain.
    """
    order = np.lexsort((np.arange(len(events.items)), events.times))  # stable by time
    items, weights = events.items[order], events.weights[order]
    unique, first, inverse = np.unique(items, return_index=True, return_inverse=True)
    if len(unique) < MIN_EVENTS:
        return None
    strongest = np.zeros(len(unique), dtype=np.float32)
    np.maximum.at(strongest, inverse, weights.astype(np.float32))
    by_time = np.argsort(first, kind="stable")
    ordered_items = unique[by_time].astype(np.int64)
    ordered_weights = strongest[by_time]
    return DeviceSplit(train_items=ordered_items[:-2], train_weights=ordered_weights[:-2],
                       val_item=int(ordered_items[-2]), test_item=int(ordered_items[-1]))


@dataclass(frozen=True)
class Interactions:
    """All devices' events as parallel arrays, sorted by device; device k owns rows offsets[k]:offsets[k+1]."""

    users: np.ndarray  # int64 [n], device index
    items: np.ndarray  # int64 [n], catalogue index
    times: np.ndarray  # int64 [n]
    weights: np.ndarray  # float32 [n]
    num_devices: int
    num_items: int

    def __post_init__(self) -> None:
        n = len(self.users)
        if not (len(self.items) == len(self.times) == len(self.weights) == n):
            raise DataError("interactions: column lengths differ")
        if n and (self.users.min() < 0 or self.users.max() >= self.num_devices):
            raise DataError(f"interactions: device index outside 0..{self.num_devices - 1}")
        if n and (self.items.min() < 0 or self.items.max() >= self.num_items):
            raise DataError(f"interactions: item index outside 0..{self.num_items - 1}")
        if n > 1 and np.any(np.diff(self.users) < 0):
            raise DataError("interactions: rows must be sorted by device")

    @classmethod
    def from_unsorted(cls, users: np.ndarray, items: np.ndarray, times: np.ndarray, weights: np.ndarray,
                      *, num_devices: int, num_items: int) -> Interactions:
        order = np.lexsort((times, users))
        return cls(users=np.asarray(users, np.int64)[order], items=np.asarray(items, np.int64)[order],
                   times=np.asarray(times, np.int64)[order], weights=np.asarray(weights, np.float32)[order],
                   num_devices=num_devices, num_items=num_items)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def offsets(self) -> np.ndarray:
        return np.searchsorted(self.users, np.arange(self.num_devices + 1)).astype(np.int64)

    def device(self, k: int) -> DeviceEvents:
        lo, hi = np.searchsorted(self.users, [k, k + 1])
        return DeviceEvents(items=self.items[lo:hi], times=self.times[lo:hi], weights=self.weights[lo:hi])

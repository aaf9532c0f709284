"""From a raw behaviour log to a prepared folder: dedupe, filter short histories, index ids, write.

Every step logs what it dropped and why, with counts; the counts also go into the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .catalogue import Catalogue
from .interactions import MIN_EVENTS, DataError, Interactions
from .prepared import write_prepared

log = logging.getLogger("fedrec.data")


@dataclass
class RawLog:
    """A loaded log before indexing: columns user, item, time, weight (pandas), plus item metadata."""

    events: pd.DataFrame  # columns: user (str), item (str), time (int64), weight (float32)
    source: str
    item_titles: dict[str, str] = field(default_factory=dict)
    item_categories: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrepareSettings:
    min_user_items: int = 5  # distinct items a device needs (train + validation + test)
    min_item_users: int = 1  # k-core threshold for items (1 = keep every item)


def prepare_log(raw: RawLog, out: Path, *, dataset: str, settings: PrepareSettings = PrepareSettings()) -> dict:
    """Turn `raw` into a prepared folder at `out`; returns the manifest's preprocessing stats."""
    if settings.min_user_items < MIN_EVENTS:
        raise DataError(f"min-user-items must be at least {MIN_EVENTS} (train, validation and test item)")
    events = raw.events
    stats: dict[str, Any] = {"rows_read": int(len(events)), **raw.stats}
    # Deduplicate (user, item): keep the first time, the strongest weight.
    deduped = (events.groupby(["user", "item"], sort=False, observed=True)
               .agg(time=("time", "min"), weight=("weight", "max")).reset_index())
    stats["duplicates_merged"] = int(len(events) - len(deduped))
    log.info("%s: %d rows, %d repeated (user, item) pairs merged", raw.source, len(events), stats["duplicates_merged"])
    deduped = _filter_cores(deduped, settings, stats)
    if deduped.empty:
        raise DataError(f"{raw.source}: no device keeps {settings.min_user_items} distinct items after filtering")
    item_ids = sorted(deduped["item"].unique(), key=_natural_key)
    user_ids = sorted(deduped["user"].unique(), key=_natural_key)
    item_index = {item: i for i, item in enumerate(item_ids)}
    user_index = {user: u for u, user in enumerate(user_ids)}
    interactions = Interactions.from_unsorted(
        deduped["user"].map(user_index).to_numpy(np.int64), deduped["item"].map(item_index).to_numpy(np.int64),
        deduped["time"].to_numpy(np.int64), deduped["weight"].to_numpy(np.float32),
        num_devices=len(user_ids), num_items=len(item_ids))
    catalogue = Catalogue(item_ids=tuple(item_ids),
                          titles=tuple(raw.item_titles.get(i, "") for i in item_ids) if raw.item_titles else None,
                          categories=tuple(raw.item_categories.get(i, "") for i in item_ids)
                          if raw.item_categories else None)
    stats.update(devices=len(user_ids), items=len(item_ids), events=len(interactions))
    write_prepared(out, interactions, catalogue, list(user_ids),
                   meta={"dataset": dataset, "source": raw.source, "preprocessing": stats})
    log.info("prepared %d devices, %d items, %d events into %s", len(user_ids), len(item_ids), len(interactions), out)
    return stats


def _filter_cores(df: pd.DataFrame, settings: PrepareSettings, stats: dict[str, Any]) -> pd.DataFrame:
    """Alternate item and user filters until both thresholds hold (a k-core)."""
    dropped_users = dropped_items = 0
    while True:
        item_users = df.groupby("item", observed=True)["user"].transform("size")
        keep = item_users >= settings.min_item_users
        dropped_items += int(df.loc[~keep, "item"].nunique())
        df = df[keep]
        user_items = df.groupby("user", observed=True)["item"].transform("size")
        keep = user_items >= settings.min_user_items
        dropped_users += int(df.loc[~keep, "user"].nunique())
        df = df[keep]
        if (df.groupby("item", observed=True)["user"].size() >= settings.min_item_users).all():
            break
    stats.update(users_dropped_short_history=dropped_users, items_dropped_rare=dropped_items)
    log.info("dropped %d devices with fewer than %d distinct items and %d items with fewer than %d devices",
             dropped_users, settings.min_user_items, dropped_items, settings.min_item_users)
    return df


def _natural_key(value: str) -> tuple[int, Any]:
    return (0, int(value)) if value.isdigit() else (1, value)

"""On a device: its own raw behaviour log turned into its training file, against the public catalogue.

The device reads its log with the same readers as `fedrec prepare` (shared/data/formats.py), keeps its own
events only, merges repeats as prepare does, maps item ids to the public catalogue's indices and writes the
file its SuperNode's `data-path` names (item_index,timestamp,weight). Nothing of any other device is read.

What differs from `fedrec prepare`, which sees everyone's log: there is no cross-device filter. An item of
the log outside the catalogue is dropped and counted (the operator's choice of catalogue, from public
metadata, replaces min-item-users); min-user-items still holds, on the device's own distinct items.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .catalogue import Catalogue
from .interactions import MIN_EVENTS, DataError, DeviceEvents
from .prepare import dedupe, write_device_file
from .prepared import refuse_inside_flower_app

if TYPE_CHECKING:
    from .formats import RawLog

log = logging.getLogger("fedrec.data")
SHOWN = 5  # ids quoted in a message (the device's own log, on its own terminal)


@dataclass(frozen=True)
class DevicePrepareSettings:
    min_user_items: int = 5  # distinct catalogue items the device needs (train + validation + test)
    user: str | None = None  # its own id in the log, where the log holds more than one user's events
    replace: bool = False  # replace an existing training file


def _shown(values: list[str]) -> str:
    return ", ".join(repr(v) for v in values[:SHOWN]) + (", ..." if len(values) > SHOWN else "")


def own_rows(raw: RawLog, user: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The rows of the device's own user: the only user of the log, or `user`."""
    present = np.unique(raw.users)
    if user is None:
        if len(present) > 1:
            ids = [raw.user_ids[c] for c in present]
            raise DataError(f"{raw.source}: holds the events of {len(present)} users ({_shown(ids)}); a device "
                            "prepares its own log only: pass --user ID (its own id in the log)")
        return np.ones(len(raw), dtype=bool), {"events_of_other_users": 0}
    try:
        code = raw.user_ids.index(str(user))
    except ValueError:
        raise DataError(f"{raw.source}: no event of user {user!r} (users in the log: "
                        f"{_shown([raw.user_ids[c] for c in present])})") from None
    mine = raw.users == code
    return mine, {"events_of_other_users": int((~mine).sum())}


def prepare_device_log(raw: RawLog, catalogue: Catalogue, out: Path, *,
                       settings: DevicePrepareSettings = DevicePrepareSettings()) -> dict[str, Any]:
    """Write the device's training file `out` from its own raw log; returns what was kept and dropped."""
    if settings.min_user_items < MIN_EVENTS:
        raise DataError(f"min-user-items must be at least {MIN_EVENTS} (train, validation and test item)")
    out = Path(out)
    refuse_inside_flower_app(out, "--out")
    if out.exists() and not settings.replace:
        raise DataError(f"{out}: already exists; pass --replace to write the device's training file again from "
                        "its log")
    mine, stats = own_rows(raw, settings.user)
    stats["events_read"] = len(raw)
    users, items, times, weights = dedupe(raw.users[mine], raw.items[mine], raw.times[mine], raw.weights[mine])
    stats["duplicates_merged"] = int(mine.sum()) - len(items)
    index = {item_id: i for i, item_id in enumerate(catalogue.item_ids)}
    mapped = np.array([index.get(raw.item_ids[c], -1) for c in items], dtype=np.int64)
    outside = mapped < 0
    outside_ids = sorted({raw.item_ids[c] for c in items[outside]})
    stats.update(events_outside_catalogue=int(outside.sum()), items_outside_catalogue=len(outside_ids))
    if outside.all():
        raise DataError(f"{raw.source}: none of its {len(outside_ids)} items is in the catalogue of "
                        f"{catalogue.num_items} items (e.g. {_shown(outside_ids)}); is the item column the "
                        "catalogue's item_id, and is this the federation's catalogue?")
    if outside.any():
        log.info("%s: dropped %d events of %d items outside the catalogue (e.g. %s)", raw.source,
                 stats["events_outside_catalogue"], len(outside_ids), _shown(outside_ids))
    keep = ~outside
    order = np.lexsort((mapped[keep], times[keep]))
    events = DeviceEvents(items=mapped[keep][order], times=times[keep][order], weights=weights[keep][order])
    if len(events) < settings.min_user_items:
        raise DataError(f"{raw.source}: {len(events)} distinct catalogue items, fewer than min-user-items "
                        f"({settings.min_user_items}): this device cannot take part until its log holds more")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    write_device_file(partial, events)
    os.replace(partial, out)  # a reader never sees half a file
    stats.update(events=len(events), items=len(np.unique(events.items)))  # one event per item after dedupe
    log.info("%s: %d events on %d catalogue items written to %s", raw.source, len(events), stats["items"], out)
    return stats

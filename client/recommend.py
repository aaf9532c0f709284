"""`fedrec device recommend`, run on a device: its top-K items from the latest item model it received."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.shared.data.catalogue import Catalogue
from fedrec.shared.data.interactions import DataError
from fedrec.shared.ranking import refit_user_row
from fedrec.shared.state import StateError, load_item_model

from .nodes import MODEL_FILE, NODE_FILE
from .state_folder import check_state_folder


@dataclass(frozen=True)
class Recommendation:
    item_index: int
    item_id: str
    label: str
    score: float


def recommend(state_path: Path, catalogue_path: Path, *, k: int = 10, data_path: Path | None = None,
              l2: float = 3.0) -> tuple[list[Recommendation], int]:
    """The device's top-k unseen items and the server round of the model used.

    The user row is re-fitted on the device from its own events against the received item model
    (as in evaluation); it is used here only and never leaves the device.
    """
    from fedrec.shared.data.prepare import read_device_file  # the raw-log readers (pandas): not for `status`

    state_path = Path(state_path)
    if k < 1:
        raise DataError(f"-k {k}: expected at least 1")
    check_state_folder(state_path)
    tables, server_round = load_item_model(state_path / MODEL_FILE)
    catalogue = Catalogue.read_csv(Path(catalogue_path))
    if catalogue.num_items != tables.num_items:
        raise DataError(f"{catalogue_path}: {catalogue.num_items} items, but the device's item model has "
                        f"{tables.num_items}: not the catalogue of this federation")
    if data_path is None:
        try:
            data_path = Path(json.loads((state_path / NODE_FILE).read_text(encoding="utf-8"))["data-path"])
        except (OSError, ValueError, KeyError) as err:
            raise StateError(f"{state_path / NODE_FILE}: cannot tell where the device's data is ({err}); pass "
                             "--data-path") from None
    events = read_device_file(Path(data_path), num_items=tables.num_items)
    seen = np.unique(events.items)
    row = refit_user_row(tables, events.items, events.weights, l2=l2)
    scores = tables.scores(row[None])[0].astype(np.float64)
    scores[seen] = -np.inf
    top = np.argsort(-scores, kind="stable")[:min(k, tables.num_items - len(seen))]
    return [Recommendation(int(i), catalogue.item_ids[i], catalogue.label(int(i)), float(scores[i])) for i in top], \
        server_round

"""The per-device public figures every reply carries (report and device records), shared by all handlers."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedrec.shared import protocol as P
from fedrec.shared.device import Device, TrainOutcome
from fedrec.shared.plans import LocalTrainingPlan


def devices_record(devices: list[Device], outcomes: list[TrainOutcome] | None = None) -> ConfigRecord:
    record: dict = {P.DEVICE_IDS: [d.device_id for d in devices]}
    if outcomes is not None:
        record[P.REFUSED] = [o.refused for o in outcomes]  # policy rule names: from the plan, not the data
    return ConfigRecord(record)


def report(outcomes: list[TrainOutcome], clipped: int | None = None) -> MetricRecord:
    """Per-device public figures: declined flags and cumulative epsilons (computed from public plans and
    histories: the headline, honest-but-curious and own-share figures) and, in the secure modes, the t and c each
    device accounted its release with (0 where it made none); `clipped` (a local-mode node's count of clipped
    updates) only where the server sees updates."""
    out = {"declined": [int(o.declined) for o in outcomes], "epsilon": [float(o.epsilon) for o in outcomes],
           "epsilon-subverted": [float(o.epsilon_subverted) for o in outcomes],
           "epsilon-honest": [float(o.epsilon_honest) for o in outcomes]}
    if any(o.secure_sum is not None for o in outcomes):
        out[P.THRESHOLD] = [o.secure_sum[0] if o.secure_sum else 0 for o in outcomes]
        out[P.COLLUDERS] = [o.secure_sum[1] if o.secure_sum else 0 for o in outcomes]
    if clipped is not None:
        out["clipped"] = clipped
    return MetricRecord(out)


def received_head(content: RecordDict, plan: LocalTrainingPlan, num_items: int) -> np.ndarray | None:
    """The trained head sent beside the tables, checked against the plan (None: the whole catalogue trains)."""
    arrays = {key: array.numpy() for key, array in content[P.HEAD].items()} if P.HEAD in content else None
    return P.head_from_arrays(arrays, size=plan.head_size, digest=plan.head_sha256, num_items=num_items)

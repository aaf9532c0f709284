"""Names and shapes of what travels between server and nodes (no Flower types here).

A node hosts one device (deployment) or a shard of simulated devices (cohort engine); every
request names the devices it is for, and every reply lists per-device reports in that order.
Train request:  tables {item-embedding, item-bias} + plan (LocalTrainingPlan as config)
                + cohort {device-ids, delta-clip-norm, attempt-nonce}
Train reply:    delta {item-embedding-delta, item-bias-delta}: the sum of the updates of the
                devices that trained, each clipped to delta-clip-norm (absent when none trained)
                + report {declined: [0|1 per device: refused or declined], epsilon: [per device], clipped}
                + device {device-ids, refused: [policy rule per device, '' if none]}
Eval request:   tables + eval (EvaluationPlan as config) + cohort
Eval reply:     metrics {hr@10, ndcg@10, recall@20: [per device that released, noised]}
                + report + device
Popularity:     request prior (PopularityPlan) + cohort; reply counts {item-counts} (the sum
                of the reporting devices' noisy indicators; absent when all declined)
                + report + device
Secure sum:     five train messages per sum, one device per node (shared/secagg.py): keys, shares, masked,
                consistency, unmask; each request carries the plan or prior, the cohort and a secagg record
                {stage, ...}; replies carry report + device and the stage's secagg record (masked: grid).
Hello (query):  reply device {device-ids} (the devices the node hosts)
Errors:         a code naming the kind of error (never its message, which may quote data)
Nothing else leaves a device: no user row, no data size, no loss. With one device per node
the sum is that device's own clipped update, so the server sees exactly what it sent.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .model import ItemTables

TABLES = "tables"
PLAN = "plan"
DELTA = "delta"
REPORT = "report"
DEVICE = "device"
EVAL = "eval"
METRICS = "metrics"
PRIOR = "prior"
COUNTS = "counts"
ITEM_COUNTS = "item-counts"
POPULARITY_MESSAGE = "train.popularity"

EMBEDDING, BIAS = "item-embedding", "item-bias"
EMBEDDING_DELTA, BIAS_DELTA = "item-embedding-delta", "item-bias-delta"
HEAD, HEAD_ITEMS = "head", "head-items"  # the item ids a round trains (shared/head.py), beside the tables
DEVICE_IDS = "device-ids"
COHORT = "cohort"
DELTA_CLIP = "delta-clip-norm"
NONCE = "attempt-nonce"
REFUSED = "refused"
THRESHOLD = "sum-threshold"  # modelled secure sum (cohort engine): t, the fewest shares in a decryptable sum
GRID = "grid"  # a node's (noised, modelled) or a device's (masked, real) contribution to a secure sum
GRID_SUM = "grid-sum"
COLLUDERS = "sum-colluders"  # modelled secure sum: c, the devices assumed to collude with the server
SECURE_SUM_SEEN = "secure-sum"  # report: the (t, c) each device accounted its release with

# The real secure sum: the protocol record of every stage's request, the stages in order, their message types.
SECAGG = "secagg"
SECAGG_STAGES = ("keys", "shares", "masked", "consistency", "unmask")
SECAGG_MESSAGE_TYPES = {stage: f"train.secagg_{stage}" for stage in SECAGG_STAGES}


class ProtocolError(ValueError):
    """A message does not have the expected records, keys, shapes or values."""


def tables_to_arrays(tables: ItemTables) -> dict[str, np.ndarray]:
    return {EMBEDDING: tables.embedding, BIAS: tables.bias}


MAX_TABLE_ABS = 1e4  # a device trains on received tables only within this: larger values can overflow the loss


def tables_from_arrays(arrays: Mapping[str, np.ndarray]) -> ItemTables:
    """The item tables a device received: float32, matching shapes, finite and bounded (checked before use)."""
    _expect_keys(arrays, (EMBEDDING, BIAS), "tables")
    emb, bias = arrays[EMBEDDING], arrays[BIAS]
    if emb.ndim != 2 or bias.shape != (emb.shape[0],) or emb.dtype != np.float32 or bias.dtype != np.float32:
        raise ProtocolError(f"tables: expected float32 embedding [items, dim] and bias [items], got "
                            f"{emb.dtype}{list(emb.shape)} and {bias.dtype}{list(bias.shape)}")
    for name, values in ((EMBEDDING, emb), (BIAS, bias)):
        # NaN/Inf or huge values would make the loss non-finite on exactly the rows a device's data touches
        if not np.all(np.abs(values) <= MAX_TABLE_ABS):
            raise ProtocolError(f"tables: '{name}' holds values that are not finite or exceed {MAX_TABLE_ABS:g}")
    return ItemTables(embedding=emb, bias=bias)


def head_to_arrays(head: np.ndarray) -> dict[str, np.ndarray]:
    return {HEAD_ITEMS: np.ascontiguousarray(head, dtype=np.int64)}


def head_from_arrays(arrays: Mapping[str, np.ndarray] | None, *, size: int, digest: str,
                     num_items: int) -> np.ndarray | None:
    """The head a training plan names (None: the whole catalogue trains), checked against the plan's size and
    digest; a head sent with a plan that names none, or missing where it names one, is refused."""
    if size == 0:
        if arrays is not None:
            raise ProtocolError("head: sent with a plan whose head-size is 0")
        return None
    if arrays is None:
        raise ProtocolError(f"head: the plan names {size} items but none were sent")
    _expect_keys(arrays, (HEAD_ITEMS,), "head")
    from .head import check_head

    try:
        return check_head(arrays[HEAD_ITEMS], size=size, digest=digest, num_items=num_items)
    except ValueError as err:
        raise ProtocolError(str(err)) from None


def delta_to_arrays(embedding_delta: np.ndarray, bias_delta: np.ndarray) -> dict[str, np.ndarray]:
    return {EMBEDDING_DELTA: embedding_delta.astype(np.float32, copy=False),
            BIAS_DELTA: bias_delta.astype(np.float32, copy=False)}


def delta_from_arrays(arrays: Mapping[str, np.ndarray], tables: ItemTables) -> tuple[np.ndarray, np.ndarray]:
    """Validate an item delta (or a sum of them) against the current tables: keys, shapes, dtype, finite values."""
    _expect_keys(arrays, (EMBEDDING_DELTA, BIAS_DELTA), "delta")
    emb, bias = arrays[EMBEDDING_DELTA], arrays[BIAS_DELTA]
    for key, value, shape in ((EMBEDDING_DELTA, emb, tables.embedding.shape), (BIAS_DELTA, bias, tables.bias.shape)):
        if value.shape != shape:
            raise ProtocolError(f"delta: '{key}' has shape {list(value.shape)}, expected {list(shape)}")
        if value.dtype != np.float32:
            raise ProtocolError(f"delta: '{key}' has dtype {value.dtype}, expected float32")
        if not np.isfinite(value).all():
            raise ProtocolError(f"delta: '{key}' holds {int((~np.isfinite(value)).sum())} NaN/Inf values")
    return emb, bias


def counts_from_arrays(arrays: Mapping[str, np.ndarray], num_items: int) -> np.ndarray:
    """Validate a (sum of) noisy item-count report(s): one finite float32 per catalogue item."""
    _expect_keys(arrays, (ITEM_COUNTS,), "counts")
    counts = arrays[ITEM_COUNTS]
    if counts.shape != (num_items,) or counts.dtype != np.float32:
        raise ProtocolError(f"counts: expected float32 [{num_items}], got {counts.dtype}{list(counts.shape)}")
    if not np.isfinite(counts).all():
        raise ProtocolError("counts: NaN/Inf values")
    return counts


def _expect_keys(arrays: Mapping[str, np.ndarray], keys: tuple[str, ...], what: str) -> None:
    if set(arrays) != set(keys):
        raise ProtocolError(f"{what}: expected keys {sorted(keys)}, got {sorted(arrays)}")


def device_ids(record: Mapping[str, object], what: str) -> list[str]:
    """The device-ids list of a cohort or device record: distinct strings."""
    ids = record.get(DEVICE_IDS) if hasattr(record, "get") else None
    if not isinstance(ids, list) or not all(isinstance(d, str) for d in ids) or len(set(ids)) != len(ids):
        raise ProtocolError(f"{what}: '{DEVICE_IDS}' should be a list of distinct strings, got {ids!r}")
    return ids


def nonce(cohort: Mapping[str, object]) -> int:
    """The attempt nonce of a request (0 when absent): every attempt of a round draws fresh noise."""
    value = cohort.get(NONCE, 0) if hasattr(cohort, "get") else 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"cohort: '{NONCE}' should be an integer, got {value!r}")
    return value


def delta_clip(cohort: Mapping[str, object]) -> float:
    """The clip a node applies to each device's whole update (0 = none); NaN/inf or negative is refused."""
    value = cohort.get(DELTA_CLIP, 0.0) if hasattr(cohort, "get") else 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= float(value) <= MAX_TABLE_ABS:
        raise ProtocolError(f"cohort: '{DELTA_CLIP}' should be a finite number >= 0, got {value!r}")
    return float(value)


def plan_digest(plan_record: Mapping[str, object]) -> bytes:
    """SHA-256 of a plan (or prior) record as sent: every member of a secure sum signs it into its advertisement,
    so server and devices must compute it alike."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(dict(plan_record), sort_keys=True, default=str).encode()).digest()


def threshold(cohort: Mapping[str, object]) -> tuple[int, int]:
    """(t, c) of a modelled secure sum (cohort engine): its threshold and the colluders it assumes; a missing or
    out-of-range value is refused."""
    value = cohort.get(THRESHOLD) if hasattr(cohort, "get") else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProtocolError(f"cohort: '{THRESHOLD}' should be an integer >= 1, got {value!r}")
    colluders = cohort.get(COLLUDERS, 0) if hasattr(cohort, "get") else None
    if isinstance(colluders, bool) or not isinstance(colluders, int) or not 0 <= colluders < value:
        raise ProtocolError(f"cohort: '{COLLUDERS}' should be an integer in [0, {value}), got {colluders!r}")
    return value, colluders


def grid_from_arrays(arrays: Mapping[str, np.ndarray], dimension: int, dtype: type = np.int64) -> np.ndarray:
    """A node's contribution to a secure sum: `dtype` [dimension] (int64 modelled, uint64 masked)."""
    _expect_keys(arrays, (GRID_SUM,), "grid")
    grid = arrays[GRID_SUM]
    if grid.shape != (dimension,) or grid.dtype != dtype:
        raise ProtocolError(f"grid: expected {np.dtype(dtype).name} [{dimension}], got {grid.dtype}{list(grid.shape)}")
    return grid

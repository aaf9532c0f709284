"""Names and shapes of what travels between server and devices (no Flower types here).

Train request:  tables {item-embedding, item-bias} + plan (LocalTrainingPlan as config)
Train reply:    delta {item-embedding-delta, item-bias-delta} (absent when declined)
                + report {declined, epsilon} + device {device-id}
Eval request:   tables + eval {server-round, target, refit-l2, sampled-seed}
Eval reply:     metrics {hr@10, ndcg@10, recall@20, sampled_*} + device {device-id}
Popularity:     request prior (PopularityPlan); reply counts {item-counts} (absent when declined)
                + report + device
Hello (query):  reply device {device-id}
Nothing else leaves a device: no user row, no data size, no loss.
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
DEVICE_ID = "device-id"


class ProtocolError(ValueError):
    """A message does not have the expected records, keys, shapes or values."""


def tables_to_arrays(tables: ItemTables) -> dict[str, np.ndarray]:
    return {EMBEDDING: tables.embedding, BIAS: tables.bias}


def tables_from_arrays(arrays: Mapping[str, np.ndarray]) -> ItemTables:
    _expect_keys(arrays, (EMBEDDING, BIAS), "tables")
    emb, bias = arrays[EMBEDDING], arrays[BIAS]
    if emb.ndim != 2 or bias.shape != (emb.shape[0],) or emb.dtype != np.float32 or bias.dtype != np.float32:
        raise ProtocolError(f"tables: expected float32 embedding [items, dim] and bias [items], got "
                            f"{emb.dtype}{list(emb.shape)} and {bias.dtype}{list(bias.shape)}")
    return ItemTables(embedding=emb, bias=bias)


def delta_to_arrays(embedding_delta: np.ndarray, bias_delta: np.ndarray) -> dict[str, np.ndarray]:
    return {EMBEDDING_DELTA: embedding_delta.astype(np.float32, copy=False),
            BIAS_DELTA: bias_delta.astype(np.float32, copy=False)}


def delta_from_arrays(arrays: Mapping[str, np.ndarray], tables: ItemTables) -> tuple[np.ndarray, np.ndarray]:
    """Validate an item delta against the current tables: keys, shapes, dtype, finite values."""
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
    """Validate a device's noisy item-count report: one finite float32 per catalogue item."""
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

"""Small builders shared by tests: plans, item tables, Flower messages outside a running federation."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

import numpy as np
from flwr.app import Message, Metadata, RecordDict

from fedrec.shared.config import RunConfig
from fedrec.shared.model import ItemTables
from fedrec.shared.training import LocalTrainingPlan

_ids = itertools.count()
# The product's defaults, so tests exercise the training a run actually does.
_RUN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)
                 if f.name in ("user_steps", "user_noise_ratio")}


def plan(**changes: Any) -> LocalTrainingPlan:
    """A small round plan with the product's block structure: `user_steps` DP steps on the user row alone (default
    RunConfig.user_steps), then the item steps; the user block's sigma is RunConfig.user_noise_ratio x the item
    sigma unless given, so a near-noiseless plan (noise_multiplier=1e-9) is near-noiseless in both blocks."""
    values: dict[str, Any] = dict(
        server_round=1, lr=0.1, user_lr=0.1, user_step_cap=0.0, user_scale=1.0, bias_scale=1.0, train_biases=True,
        steps=1, user_steps=_RUN_DEFAULTS["user_steps"], sample_rate=1.0, num_negatives=3, dp=True,
        noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, grad_sample_mode="hooks")
    values.update(changes)
    values.setdefault("user_noise_multiplier", _RUN_DEFAULTS["user_noise_ratio"] * values["noise_multiplier"])
    return LocalTrainingPlan(**values)


def tables(num_items: int = 20, dim: int = 4, seed: int = 0) -> ItemTables:
    return ItemTables.initial(num_items, dim, scale=0.3, rng=np.random.default_rng(seed))


def message(content: RecordDict, *, dst: int, message_type: str, src: int = 1) -> Message:
    """A request as a SuperLink would deliver it (Flower needs a run's identity to build one otherwise)."""
    metadata = Metadata(run_id=1, message_id=f"m{next(_ids)}", src_node_id=src, dst_node_id=dst,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                        message_type=message_type)
    return Message(content=content, metadata=metadata)

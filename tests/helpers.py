"""Small builders shared by tests: plans, item tables, Flower messages outside a running federation."""

from __future__ import annotations

import itertools
import time

import numpy as np
from flwr.app import Message, Metadata, RecordDict

from fedrec.shared.model import ItemTables
from fedrec.shared.training import LocalTrainingPlan

_ids = itertools.count()


def plan(**changes) -> LocalTrainingPlan:
    values = dict(server_round=1, lr=0.1, user_lr=0.1, user_step_cap=0.0, user_scale=1.0, bias_scale=1.0, train_biases=True, steps=1, user_steps=0,
                  user_noise_multiplier=1.0, sample_rate=1.0, num_negatives=3, dp=True,
                  noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, grad_sample_mode="hooks")
    values.update(changes)
    return LocalTrainingPlan(**values)


def tables(num_items: int = 20, dim: int = 4, seed: int = 0) -> ItemTables:
    return ItemTables.initial(num_items, dim, scale=0.3, rng=np.random.default_rng(seed))


def message(content: RecordDict, *, dst: int, message_type: str, src: int = 1) -> Message:
    """A request as a SuperLink would deliver it (Flower needs a run's identity to build one otherwise)."""
    metadata = Metadata(run_id=1, message_id=f"m{next(_ids)}", src_node_id=src, dst_node_id=dst,
                        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
                        message_type=message_type)
    return Message(content=content, metadata=metadata)

"""Reference recommenders on the same split: random, popularity, centrally trained MF (non-private)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data.interactions import DeviceSplit
from .evaluation import evaluate_population
from .model import ItemTables, MatrixFactorization, SampledSoftmaxLoss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CentralMFSettings:
    """Hyper-parameters of the centrally trained MF baseline."""

    dim: int = 32
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.01
    num_negatives: int = 16
    l2: float = 1e-6
    init_scale: float = 0.1


def train_counts(splits: Sequence[DeviceSplit], num_items: int) -> np.ndarray:
    counts = np.zeros(num_items, dtype=np.float64)
    for split in splits:
        np.add.at(counts, split.train_items, 1.0)
    return counts


def random_metrics(splits: Sequence[DeviceSplit], num_items: int, *, seed: int) -> dict[str, float]:
    rng = np.random.default_rng([seed, 0xBA5E])

    def block(idx: np.ndarray) -> np.ndarray:
        return rng.random((len(idx), num_items))

    return evaluate_population(block, splits, num_items, sampled_seed=seed)


def popularity_metrics(splits: Sequence[DeviceSplit], num_items: int, *, seed: int) -> dict[str, float]:
    counts = train_counts(splits, num_items)
    return evaluate_population(lambda idx: np.broadcast_to(counts, (len(idx), num_items)), splits, num_items,
                               sampled_seed=seed)


def train_central_mf(splits: Sequence[DeviceSplit], num_items: int, settings: CentralMFSettings, *,
                     seed: int) -> tuple[np.ndarray, ItemTables]:
    """Full-data MF with the same model and loss as the devices, trained with Adam; returns (user rows, items)."""
    gen = torch.Generator().manual_seed(seed)
    users = torch.from_numpy(np.concatenate([np.full(len(s.train_items), u) for u, s in enumerate(splits)]))
    positives = torch.from_numpy(np.concatenate([s.train_items for s in splits]))
    weights = torch.from_numpy(np.concatenate([s.train_weights for s in splits]).astype(np.float32))
    model = MatrixFactorization(torch.randn(len(splits), settings.dim, generator=gen) * settings.init_scale,
                                torch.randn(num_items, settings.dim, generator=gen) * settings.init_scale,
                                torch.zeros(num_items), num_items=num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.l2)
    loss_fn = SampledSoftmaxLoss(reduction="mean")
    for epoch in range(settings.epochs):
        order = torch.randperm(len(users), generator=gen)
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            negatives = torch.randint(num_items, (len(idx), settings.num_negatives), generator=gen)
            items = torch.cat([positives[idx, None], negatives], dim=1)
            optimizer.zero_grad()
            loss = loss_fn(model(users[idx], items), weights[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        log.debug("central MF epoch %d/%d loss %.4f", epoch + 1, settings.epochs, total / len(order))
    tables = ItemTables(embedding=model.item_embedding.weight.detach().numpy().copy(), bias=model.bias_values())
    return model.user_values(), tables


def central_mf_metrics(splits: Sequence[DeviceSplit], num_items: int, settings: CentralMFSettings, *,
                       seed: int) -> dict[str, float]:
    user_rows, tables = train_central_mf(splits, num_items, settings, seed=seed)
    return evaluate_population(lambda idx: tables.scores(user_rows[idx]), splits, num_items, sampled_seed=seed)

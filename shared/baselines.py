"""Reference recommenders on the same split: random, popularity, central MF (non-private and with DP-SGD)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data.interactions import DeviceSplit
from .evaluation import CategoryDiversity, evaluate_population
from .model import ItemTables, MatrixFactorization, SampledSoftmaxLoss
from .privacy.accounting import calibrate_noise_multiplier, epsilon
from .training import make_private

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CentralMFSettings:
    """Hyper-parameters of the centrally trained MF baselines."""

    dim: int = 32
    epochs: int = 40  # at most; the non-private model keeps the epoch that does best on validation
    eval_every: int = 5
    batch_size: int = 256
    lr: float = 0.01
    num_negatives: int = 16
    l2: float = 1e-6
    init_scale: float = 0.1


@dataclass(frozen=True)
class CentralDP:
    """Record-level DP-SGD for the central baseline: the same unit (one interaction) as the devices' epsilon."""

    epsilon: float
    delta: float
    clip_norm: float = 1.0
    epochs: int = 10
    sample_rate: float | None = None  # default batch_size / examples


def train_counts(splits: Sequence[DeviceSplit], num_items: int) -> np.ndarray:
    counts = np.zeros(num_items, dtype=np.float64)
    for split in splits:
        np.add.at(counts, split.train_items, 1.0)
    return counts


def random_metrics(splits: Sequence[DeviceSplit], num_items: int, *, seed: int,
                   diversity: CategoryDiversity | None = None) -> dict[str, float]:
    rng = np.random.default_rng([seed, 0xBA5E])

    def block(idx: np.ndarray) -> np.ndarray:
        return rng.random((len(idx), num_items))

    return evaluate_population(block, splits, num_items, sampled_seed=seed, diversity=diversity)


def popularity_metrics(splits: Sequence[DeviceSplit], num_items: int, *, seed: int,
                       diversity: CategoryDiversity | None = None) -> dict[str, float]:
    counts = train_counts(splits, num_items)
    return evaluate_population(lambda idx: np.broadcast_to(counts, (len(idx), num_items)), splits, num_items,
                               sampled_seed=seed, diversity=diversity)


def train_central_mf(splits: Sequence[DeviceSplit], num_items: int, settings: CentralMFSettings, *,
                     seed: int, dp: CentralDP | None = None) -> tuple[np.ndarray, ItemTables, dict]:
    """Full-data MF with the devices' model and loss; returns (user rows, item tables, training info).

    Without DP: Adam, minibatches, the epoch with the best validation HR@10 is kept.
    With DP: Opacus DP-SGD (Poisson sampling of interactions, per-example clipping over user
    rows and item tables, ghost clipping), noise calibrated to `dp.epsilon`; no selection on
    validation (that would use the data outside the guarantee).
    """
    gen = torch.Generator().manual_seed(seed)
    users = torch.from_numpy(np.concatenate([np.full(len(s.train_items), u) for u, s in enumerate(splits)]))
    positives = torch.from_numpy(np.concatenate([s.train_items for s in splits]))
    weights = torch.from_numpy(np.concatenate([s.train_weights for s in splits]).astype(np.float32))
    model = MatrixFactorization(torch.randn(len(splits), settings.dim, generator=gen) * settings.init_scale,
                                torch.randn(num_items, settings.dim, generator=gen) * settings.init_scale,
                                torch.zeros(num_items), num_items=num_items)
    examples = len(users)
    optimizer: Any = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=0.0 if dp else settings.l2)
    criterion: Any = SampledSoftmaxLoss(reduction="mean")
    module: Any = model
    info: dict[str, Any] = {"examples": examples}
    if dp is not None:
        q = dp.sample_rate or min(1.0, settings.batch_size / examples)
        steps = int(np.ceil(dp.epochs / q))
        sigma = calibrate_noise_multiplier(target_epsilon=dp.epsilon, delta=dp.delta, sample_rate=q, steps=steps)
        module, optimizer, criterion = make_private(model, optimizer, criterion, sigma=sigma, clip_norm=dp.clip_norm,
                                                    mode="ghost", noise_seed=seed, loss_reduction="mean",
                                                    expected_batch_size=q * examples)
        info.update(sample_rate=q, steps=steps, noise_multiplier=sigma,
                    epsilon=epsilon([(sigma, q, steps)], delta=dp.delta))
        for _ in range(steps):
            batch = torch.nonzero(torch.rand(examples, generator=gen) < q).squeeze(1)
            _step(module, optimizer, criterion, users[batch], positives[batch], weights[batch], num_items, settings,
                  gen)
        return _export(model)[0], _export(model)[1], info
    best = (-1.0, 0, None)
    for epoch in range(1, settings.epochs + 1):
        order = torch.randperm(examples, generator=gen)
        for start in range(0, examples, settings.batch_size):
            idx = order[start:start + settings.batch_size]
            _step(module, optimizer, criterion, users[idx], positives[idx], weights[idx], num_items, settings, gen)
        if epoch % settings.eval_every == 0 or epoch == settings.epochs:
            rows, tables = _export(model)
            val = evaluate_population(lambda idx: tables.scores(rows[idx]), splits, num_items, target="val",
                                      sampled_seed=None)["hr@10"]
            log.debug("central MF epoch %d: validation HR@10 %.4f", epoch, val)
            if val > best[0]:
                best = (val, epoch, (rows, tables))
    info.update(best_epoch=best[1], validation_hr=best[0])
    return best[2][0], best[2][1], info


def _step(module: Any, optimizer: Any, criterion: Any, users: torch.Tensor, positives: torch.Tensor,
          weights: torch.Tensor, num_items: int, settings: CentralMFSettings, gen: torch.Generator) -> None:
    negatives = torch.randint(num_items, (len(users), settings.num_negatives), generator=gen)
    items = torch.cat([positives[:, None], negatives], dim=1)
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        loss = criterion(module(users, items), weights)
        loss.backward()
    optimizer.step()


def _export(model: MatrixFactorization) -> tuple[np.ndarray, ItemTables]:
    tables = ItemTables(embedding=model.item_embedding.weight.detach().numpy().copy(), bias=model.bias_values())
    return model.user_values(), tables


def central_mf_metrics(splits: Sequence[DeviceSplit], num_items: int, settings: CentralMFSettings, *,
                       seed: int) -> dict[str, float]:
    user_rows, tables, _ = train_central_mf(splits, num_items, settings, seed=seed)
    return evaluate_population(lambda idx: tables.scores(user_rows[idx]), splits, num_items, sampled_seed=seed)

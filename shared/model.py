"""Matrix factorisation with a named split: local user rows, global item embeddings and biases.

The item tables (what travels and what the server keeps) are numpy only. The torch modules that
train them, MatrixFactorization and SampledSoftmaxLoss, live in shared/model_torch.py and are
re-exported here on first use, so that importing this module never imports torch or Opacus.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ItemTables:
    """The global item model: what the server sends and aggregates (public catalogue order)."""

    embedding: np.ndarray  # float32 [num_items, dim]
    bias: np.ndarray  # float32 [num_items]

    def __post_init__(self) -> None:
        if self.embedding.ndim != 2 or self.bias.shape != (self.embedding.shape[0],):
            raise ValueError(f"item tables: embedding {self.embedding.shape} and bias {self.bias.shape} do not match")

    @property
    def num_items(self) -> int:
        return self.embedding.shape[0]

    @property
    def dim(self) -> int:
        return self.embedding.shape[1]

    @classmethod
    def initial(cls, num_items: int, dim: int, *, scale: float, rng: np.random.Generator) -> ItemTables:
        return cls(embedding=(rng.standard_normal((num_items, dim)) * scale).astype(np.float32),
                   bias=np.zeros(num_items, dtype=np.float32))

    def take(self, rows: np.ndarray | None) -> ItemTables:
        """The tables restricted to `rows` (None: all), in their order: what a round with a trained head trains."""
        if rows is None:
            return self
        return ItemTables(embedding=np.ascontiguousarray(self.embedding[rows]),
                          bias=np.ascontiguousarray(self.bias[rows]))

    def scores(self, user_rows: np.ndarray) -> np.ndarray:
        """Scores [num_users, num_items] for a block of user rows [num_users, dim]."""
        return user_rows @ self.embedding.T + self.bias


def category_embeddings(categories: Sequence[str], dim: int, *, rng: np.random.Generator) -> np.ndarray:
    """Per item, the mean of a random direction per public category ('|'-separated labels; none: zeros)."""
    labels = [[c for c in str(cats).split("|") if c] for cats in categories]
    names = sorted({c for item in labels for c in item})
    directions = rng.standard_normal((len(names), dim))
    index = {name: k for k, name in enumerate(names)}
    out = np.zeros((len(labels), dim))
    for i, item in enumerate(labels):
        if item:
            out[i] = directions[[index[c] for c in item]].mean(axis=0)
    return out


def initial_item_tables(num_items: int, dim: int, *, scale: float, seed: int,
                        categories: Sequence[str] | None = None, category_scale: float = 0.0) -> ItemTables:
    """Random item embeddings, plus a shared random direction per public category when configured.

    Categories are public catalogue metadata: items of a category start close together, which
    gives users' rows something to align with from the first round at no privacy cost.
    """
    tables = ItemTables.initial(num_items, dim, scale=scale, rng=np.random.default_rng([seed, 0x17E4]))
    if category_scale <= 0 or not categories:
        return tables
    shared = category_embeddings(categories, dim, rng=np.random.default_rng([seed, 0xCA7]))
    return ItemTables(embedding=(tables.embedding + category_scale * shared).astype(np.float32), bias=tables.bias)


def initial_user_row(dim: int, *, scale: float, rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal(dim) * scale).astype(np.float32)


_TORCH_NAMES = ("MatrixFactorization", "SampledSoftmaxLoss")


def __getattr__(name: str) -> Any:
    """`from fedrec.shared.model import MatrixFactorization` keeps working; torch loads only then."""
    if name in _TORCH_NAMES:
        from . import model_torch

        return getattr(model_torch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

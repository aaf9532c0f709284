"""The torch side of the matrix factorisation: the module a device trains and its sampled-softmax loss.

Imported only where training happens (shared/training.py, the central baselines); the numpy
item tables are in shared/model.py, which re-exports these names.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .privacy.embedding_norms import RowEmbedding


class MatrixFactorization(nn.Module):
    """Implicit-feedback MF over users and item-table copies: score(u, i) = <p_u, q_{c(u), i}> + b_{c(u), i}.

    ``item_copies=1``: all users share one item table (central training).
    ``item_copies=num_users``: user u trains its own copy of the item tables, at rows
    ``u * num_items + i`` (one device, or a cohort of devices trained in one DP pass).
    User rows and biases are stored divided by `user_scale` / `bias_scale`: the scales set
    their share of each example's clipping budget under DP (gradient x scale) and their
    effective learning rate (lr x scale^2), without changing the function.
    """

    def __init__(self, user_rows: torch.Tensor, item_embedding: torch.Tensor, item_bias: torch.Tensor,
                 *, num_items: int, user_scale: float = 1.0, bias_scale: float = 1.0) -> None:
        super().__init__()
        self.num_items = num_items
        self.user_scale, self.bias_scale = user_scale, bias_scale
        self.item_copies = item_embedding.shape[0] // num_items
        if self.item_copies not in (1, user_rows.shape[0]) or item_embedding.shape[0] % num_items:
            raise ValueError(f"item table rows {item_embedding.shape[0]} must be num_items ({num_items}) "
                             f"times 1 or the number of users ({user_rows.shape[0]})")
        self.user = RowEmbedding.from_pretrained(user_rows / user_scale, freeze=False)
        self.item_embedding = RowEmbedding.from_pretrained(item_embedding.clone(), freeze=False)
        self.item_bias = RowEmbedding.from_pretrained(item_bias.reshape(-1, 1) / bias_scale, freeze=False)

    def user_values(self) -> np.ndarray:
        return (self.user_scale * self.user.weight.detach()).numpy()

    def bias_values(self) -> np.ndarray:
        return (self.bias_scale * self.item_bias.weight.detach()[:, 0]).numpy()

    def local_parameters(self) -> list[nn.Parameter]:
        """Parameters that never leave the device."""
        return [self.user.weight]

    def global_parameters(self) -> list[nn.Parameter]:
        """Parameters whose update is sent to the server."""
        return [self.item_embedding.weight, self.item_bias.weight]

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits [B, L] for users [B] and item ids [B, L]; one lookup per table (ghost clipping needs it)."""
        rows = items if self.item_copies == 1 else users[:, None] * self.num_items + items
        p = self.user_scale * self.user(users)
        q = self.item_embedding(rows)
        b = self.bias_scale * self.item_bias(rows).squeeze(-1)
        return torch.einsum("bd,bld->bl", p, q) + b


class SampledSoftmaxLoss(nn.Module):
    """Weighted cross-entropy of the positive (column 0) against its sampled negatives.

    Has a ``reduction`` attribute so Opacus ghost clipping can ask for per-example losses.
    """

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        per_example = -torch.log_softmax(logits, dim=1)[:, 0] * weights
        if self.reduction == "none":
            return per_example
        if self.reduction == "sum":
            return per_example.sum()
        return per_example.mean()

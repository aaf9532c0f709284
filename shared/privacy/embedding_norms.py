"""Exact per-example gradient norms of embedding lookups for Opacus ghost clipping, without torch.unique.

An example looks up L rows of a table and receives an output gradient G[l] (dim d) for each.
Its gradient on the table is, per distinct row r, the sum of the G[l] with id[l] = r, so

    |grad|^2 = sum_{l, m : id[l] = id[m]} <G[l], G[m]>

a masked Gram matrix of size L x L per example. Opacus's generic sampler finds the distinct
(example, row) pairs with torch.unique over the whole batch instead; for the short lookups of
this model (one user row; a positive and its negatives) the Gram form is the same number and
several times faster. Long lookups fall back to Opacus's sampler.
"""

from __future__ import annotations

import torch

from .. import opacus_lean  # noqa: F401 - first: defers opacus's package __init__ (see there)

# isort: split
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.embedding import compute_embedding_grad_sample
from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample
from torch import nn

GRAM_MAX_LOOKUPS = 64  # L above which the L x L Gram matrix costs more than sorting


class RowEmbedding(nn.Embedding):
    """nn.Embedding whose per-example gradient norms Opacus computes with `lookup_norms`."""


def lookup_norms(layer: nn.Embedding, activations: list[torch.Tensor],
                 backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    ids = activations[0]
    if ids.shape[0] == 0:
        # An empty Poisson batch has no examples to clip; Opacus's own sampler fails on it (reshape of 0
        # elements with -1), so answer here: the optimizer then adds the full noise and the step is accounted.
        return {layer.weight: backprops.new_zeros(0)}
    ids = ids.reshape(ids.shape[0], -1)
    if ids.shape[1] > GRAM_MAX_LOOKUPS:
        return compute_embedding_norm_sample(layer, activations, backprops)
    grads = backprops.reshape(ids.shape[0], ids.shape[1], -1)
    if ids.shape[1] == 1:
        return {layer.weight: grads[:, 0].norm(dim=1)}
    same_row = (ids[:, :, None] == ids[:, None, :]).to(grads.dtype)
    squared = (torch.bmm(grads, grads.transpose(1, 2)) * same_row).sum(dim=(1, 2))
    return {layer.weight: squared.clamp_min(0).sqrt()}


register_grad_sampler(RowEmbedding)(compute_embedding_grad_sample)
register_norm_sampler(RowEmbedding)(lookup_norms)

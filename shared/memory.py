"""What one round of local training needs in memory, from public quantities only (no torch: checked before any data).

A device's memory use, and so whether it fails, must not depend on its private data (docs: privacy model). Every
choice that sets an allocation in shared/training.py comes from here, and reads only what the server sent or chose:
the plan (q and steps play no part; the negatives, the blocks and the grad-sample mode do), the item tables' shape
(catalogue size n, dimension d) and the cohort size K (1 on a deployed device). Never |D| nor a sampled batch size.

Per step, the Poisson-sampled batch (whose size is private) is processed in chunks of exactly `chunk` examples, the
last one padded with zero-weight examples (their clipped gradient is exactly zero), accumulating the clipped
per-example gradient sum; the noise is added once per step. So the peak of one chunk is the same for every |D|: a
device with more data runs more chunks (time is a listed channel; memory is not).

The peak need of a round, in bytes (F = 4 bytes a float32, I = 8 bytes an index, L = negatives + 1 lookups an
example, R = K x n stacked item rows, w = d + 1 floats an item row):

    need = TABLE_COPIES x F x (R x w + K x d) [+ EXACT_COPIES x 2F x R x w in distributed mode]
           + max over the round's blocks of (chunk x per_example_bytes(block))

    per_example_bytes = SLACK x (activations + clipping)
    activations = I x (4L + 4) + F x (2Ld + 5d + 10L + 1)          (ids, lookups, logits, their gradients)
    clipping    = per table the block trains (rows r, width w, lookups l an example):
                  hooks: 2F x r x w + I x l x w (Opacus's dense per-example gradient, the copy it keeps of it,
                         and its scatter index)
                  ghost: 13 l^2 (masked Gram, l <= 64) or I x 8l + F x 3lw (Opacus's norm sampler, longer lookups)
    chunk       = clamp(CHUNK_BYTES // per_example_bytes, 1, CHUNK_EXAMPLES_PER_DEVICE x K)

Left out, and independent of the plan: the process itself (Python, torch) and the device's own interactions, read
after the check (under 40 bytes an interaction: ids, weights, the sampling draw and the sampled positions); a device
sets `max-memory-mb` below what it can spare by that much.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

FLOAT, INDEX = 4, 8
CHUNK_BYTES = 32 * 2**20  # the per-example working memory one chunk aims at
# At most this many examples a chunk per device of the cohort: every step runs at least one full (padded) chunk, so
# a small device pays for the padding. Measured (CPU time, 1 thread, 1000 items, dim 16, 16 negatives, q = 1): one
# device 5.9 -> 10.9 ms at |D| = 20, 18.7 -> 13.6 at 100, 28.7 -> 31.8 at 1000; 100 devices of 100: 493 -> 524 ms
# (1024 a device: 3-4x slower below |D| = 100; 64 MB chunks: 1.5x slower for a cohort at q = 0.1).
CHUNK_EXAMPLES_PER_DEVICE = 256
# 'auto' takes Opacus hooks (dense per-example gradients) only where a full chunk's dense gradients fit in
# HOOKS_MEMORY_LIMIT_BYTES; otherwise ghost clipping. Measured on 2 cores: ghost is faster from a few MB of dense
# gradients on (one device, 1000 items, dim 16, 1000 examples: 25 ms against 91 ms with hooks); hooks spare a
# deployed device ghost clipping's imports (0.2 s a message) on tiny catalogues.
HOOKS_MEMORY_LIMIT_BYTES = 16 * 2**20
# Allocator rounding and temporaries the count leaves out. Measured peaks (VmHWM) over ten plans (hooks, ghost, one
# block, 1000 negatives, distributed, no DP; 1000 to 50000 items): at most 0.48 of the need (tests/test_memory.py
# checks one of them in a fresh process).
SLACK = 2
TABLE_COPIES = 12  # float32 copies of the stacked tables alive at once: received, model, grad, summed, noise, ...
EXACT_COPIES = 3  # distributed mode: the float64 exact item step (grad, scaled, running sum)
# shared/training.py pins glibc's mmap threshold here: its dynamic threshold let the heap's fragmentation, and so the
# peak, grow with the number of chunks a device runs (measured: up to 1.5x from 1 chunk to a dozen; pinned, within
# a few MB)
M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 2**20
GRAM_MAX_LOOKUPS = 64  # shared/privacy/embedding_norms.py: the masked Gram up to here, Opacus's sampler above


class TrainingShape(Protocol):
    """What the memory need reads of a LocalTrainingPlan (shared/plans.py)."""

    dp: bool
    privacy: str
    user_steps: int
    num_negatives: int
    train_biases: bool
    grad_sample_mode: str


@dataclass(frozen=True)
class Block:
    """One block of a round (see shared/training.py `_phases`): how its per-example work is done and chunked."""

    which: str  # 'user' (user row alone), 'items' (item tables alone) or 'all'
    mode: str  # 'hooks' | 'ghost' (Opacus per-example clipping) or 'none' (no per-example clipping)
    chunk: int  # examples per chunk (the last one padded)
    example_bytes: int  # working memory per example of a chunk

    @property
    def chunk_bytes(self) -> int:
        return self.chunk * self.example_bytes


def choose_grad_sample_mode(requested: str, *, rows: int, dim: int,
                            limit: int = HOOKS_MEMORY_LIMIT_BYTES) -> str:
    """hooks or ghost for `requested` ('auto': from the table's shape alone, never from a batch size)."""
    if requested != "auto":
        return requested
    dense_bytes = FLOAT * CHUNK_EXAMPLES_PER_DEVICE * rows * (dim + 1)
    return "ghost" if dense_bytes > limit else "hooks"


def blocks(plan: TrainingShape, *, num_items: int, dim: int, cohort: int = 1,
           hooks_limit: int = HOOKS_MEMORY_LIMIT_BYTES) -> list[Block]:
    """The round's blocks in order, each with its grad-sample mode and chunk size.

    A block that trains the user row clips from the per-example gradients it applies (hooks), whatever the plan asks
    (shared/training.py says why); the item block takes the plan's mode ('auto' from the shape).
    """
    whiches = ["user", "items"] if plan.user_steps > 0 else ["all"]
    lookups = plan.num_negatives + 1
    result = []
    for which in whiches:
        if not plan.dp or plan.privacy == "user":
            mode = "none"
        elif which in ("user", "all"):
            mode = "hooks"
        else:
            mode = choose_grad_sample_mode(plan.grad_sample_mode, rows=cohort * num_items, dim=dim, limit=hooks_limit)
        trained = []  # (rows, width, lookups an example) of each table the block trains
        if which in ("user", "all"):
            trained.append((cohort, dim, 1))
        if which in ("items", "all"):
            trained.append((cohort * num_items, dim, lookups))
            if plan.train_biases:
                trained.append((cohort * num_items, 1, lookups))
        per_example = example_bytes(mode, trained=trained, dim=dim, lookups=lookups)
        result.append(Block(which=which, mode=mode, chunk=chunk_size(per_example, cohort=cohort),
                            example_bytes=per_example))
    return result


def example_bytes(mode: str, *, trained: list[tuple[int, int, int]], dim: int, lookups: int) -> int:
    """Working memory of one example in a chunk (see the module docstring); `trained`: (rows, width, lookups) of
    each table the block trains."""
    d, L = dim, lookups
    total = INDEX * (4 * L + 4) + FLOAT * (2 * L * d + 5 * d + 10 * L + 1)
    for rows, width, looked_up in trained:
        if mode == "hooks":  # Opacus's embedding sampler: a dense [rows, width] gradient, the copy Opacus stores it
            total += 2 * FLOAT * rows * width + INDEX * looked_up * width  # in (_current_grad_sample), scatter index
        elif mode == "ghost" and looked_up <= GRAM_MAX_LOOKUPS:  # the masked Gram: ids equal, as float, bmm, product
            total += 13 * looked_up**2
        elif mode == "ghost":  # Opacus's norm sampler (torch.unique over example and row)
            total += INDEX * 8 * looked_up + FLOAT * 3 * looked_up * width
    return SLACK * total


def chunk_size(per_example_bytes: int, *, cohort: int = 1) -> int:
    """Examples per chunk: as many as fit CHUNK_BYTES, at least one, at most CHUNK_EXAMPLES_PER_DEVICE x K."""
    return max(1, min(CHUNK_EXAMPLES_PER_DEVICE * cohort, CHUNK_BYTES // max(1, per_example_bytes)))


def table_bytes(plan: TrainingShape, *, num_items: int, dim: int, cohort: int = 1) -> int:
    """The copies of the stacked tables a round holds at once (independent of the data and of the chunks)."""
    rows = cohort * num_items
    need = TABLE_COPIES * FLOAT * (rows * (dim + 1) + cohort * dim)
    if plan.dp and plan.privacy == "distributed":
        need += EXACT_COPIES * 2 * FLOAT * rows * (dim + 1)
    return need


def training_memory_bytes(plan: TrainingShape, *, num_items: int, dim: int, cohort: int = 1,
                          exact_clipping: bool = False) -> int:
    """The peak memory (bytes) one round of `plan` needs on tables of `num_items` x `dim`, for `cohort` devices.

    `exact_clipping`: the device's policy keeps ghost clipping off (shared/policy.py), so every block uses hooks.
    """
    if exact_clipping and plan.grad_sample_mode != "hooks":
        plan = replace(plan, grad_sample_mode="hooks")  # type: ignore[type-var]
    work = max(b.chunk_bytes for b in blocks(plan, num_items=num_items, dim=dim, cohort=cohort))
    return table_bytes(plan, num_items=num_items, dim=dim, cohort=cohort) + work

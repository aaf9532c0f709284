"""Local training of one device (or a cohort of devices in one pass) with Opacus DP-SGD.

A round of local training, for each device k in the cohort:
  1. restore its user row and its privacy history, take the received item tables;
  2. for each of the round's steps: Poisson-sample its interactions with rate q, pair each
     sampled positive with negatives drawn from the public catalogue, and take one DP-SGD
     step (per-example clipping to C over user row AND item tables, Gaussian noise
     N(0, (sigma*C)^2) on every coordinate, summed loss: no division by the private data size).
     The sampled batch, whose size is private, runs in chunks of a fixed size set by public
     quantities only (shared/memory.py), the last padded with zero-weight examples: the clipped
     per-example gradients are summed over the chunks and the noise is added once, so the memory
     a step needs is the same for every data size (a larger device runs more chunks);
  3. return the new user row (stays on the device), the item-table delta (sent), and the
     history with the round's steps appended.
Device k's copy of the item tables sits at rows k*num_items..(k+1)*num_items of one
stacked table, so every example only touches its own device's rows: clipping, noise and
accounting are exactly those of K separate runs.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import opacus_lean  # noqa: F401 - first: defers opacus's package __init__ (see there)

# isort: split
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers.optimizer import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping

from . import memory
from .memory import choose_grad_sample_mode  # noqa: F401 - re-exported
from .model import ItemTables
from .model_torch import MatrixFactorization, SampledSoftmaxLoss
from .plans import (  # noqa: F401 - re-exported: the plan a device parses without torch (shared/plans.py)
    MAX_LR, MAX_NEGATIVES, MAX_NOISE_MULTIPLIER, SCALE_RANGE, LocalTrainingPlan, PlanError, plan_from_config)
from .privacy.accounting import HistoryEntry, compact_history

# Hooks materialise dense per-sample gradients (chunk * rows * dim floats); ghost clipping needs a second backward
# pass but no such tensor. 'auto' picks from the tables' shape alone (shared/memory.py), read here at each round.
HOOKS_MEMORY_LIMIT_BYTES = memory.HOOKS_MEMORY_LIMIT_BYTES


@dataclass(frozen=True)
class DeviceTrainingData:
    """One device's training interactions and its deterministic randomness for this round."""

    items: np.ndarray  # int64 [n]
    weights: np.ndarray  # float32 [n]
    seed: tuple[int, ...]


@dataclass(frozen=True)
class CohortUpdate:
    """Result of local training for K devices (row k belongs to device k)."""

    user_rows: np.ndarray  # [K, dim]  stays on the device
    embedding_delta: np.ndarray  # [K, num_items, dim]  sent
    bias_delta: np.ndarray  # [K, num_items]  sent
    histories: list[list[HistoryEntry]]
    examples_used: np.ndarray  # [K] sampled examples per device (local diagnostics only, never sent)


class LocalSGD(torch.optim.Optimizer):
    """SGD whose steps for a group can be capped per row (each device's user row moves at most `row_step_cap`).

    It runs after Opacus has clipped and noised the gradient, so the cap is post-processing of
    a private quantity: it keeps heavy users' rows stable without using their private data size.
    """

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        super().__init__(groups, defaults={"lr": 0.0, "row_step_cap": 0.0})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = group["lr"] * param.grad
                if group["row_step_cap"] > 0:
                    norms = update.norm(dim=1, keepdim=True)
                    update = update * torch.clamp(group["row_step_cap"] / (norms + 1e-12), max=1.0)
                param.sub_(update)


def _phases(plan: LocalTrainingPlan) -> list[tuple[str, int, float]]:
    """(which parameters train, steps, noise multiplier) in order.

    With `user_steps` > 0 a round alternates blocks: first the user row alone (items frozen),
    then the item tables alone (user row frozen), so each block's clipping budget is spent on
    its own parameters and the item step sees a user row fitted to the current items.
    """
    if plan.user_steps > 0:
        return [("user", plan.user_steps, plan.user_noise_multiplier), ("items", plan.steps, plan.noise_multiplier)]
    return [("all", plan.steps, plan.noise_multiplier)]


def train_cohort(plan: LocalTrainingPlan, items: ItemTables, user_rows: np.ndarray,
                 data: Sequence[DeviceTrainingData], histories: Sequence[Sequence[HistoryEntry]],
                 *, noise_seed: int) -> CohortUpdate:
    """Run one round of local training for the devices in `data` against the same item tables."""
    k_devices, n_items = len(data), items.num_items
    pin_allocator()
    if user_rows.shape != (k_devices, items.dim):
        raise ValueError(f"user rows {user_rows.shape} do not match {k_devices} devices of dim {items.dim}")
    model = MatrixFactorization(
        torch.from_numpy(np.ascontiguousarray(user_rows, dtype=np.float32)),
        torch.from_numpy(np.tile(items.embedding, (k_devices, 1))),
        torch.from_numpy(np.tile(items.bias, k_devices)),
        num_items=n_items, user_scale=plan.user_scale, bias_scale=plan.bias_scale,
    )
    new_histories: list[list[HistoryEntry]] = [[tuple(h) for h in history] for history in histories]
    generators = [torch.Generator().manual_seed(_seed_int(d.seed)) for d in data]
    positives = [torch.from_numpy(d.items.astype(np.int64)) for d in data]
    weights = [torch.from_numpy(d.weights.astype(np.float32)) for d in data]
    examples_used = np.zeros(k_devices, dtype=np.int64)
    exact: dict[str, torch.Tensor] = {}  # distributed: the noise-free item step, in float64 (see below)
    # Modes and chunk sizes from public quantities only (the plan, the tables' shape, the cohort size K).
    layout = memory.blocks(plan, num_items=n_items, dim=items.dim, cohort=k_devices,
                           hooks_limit=HOOKS_MEMORY_LIMIT_BYTES)
    for phase, ((which, steps, sigma), block) in enumerate(zip(_phases(plan), layout, strict=True)):
        groups = []
        if which in ("user", "all"):
            groups.append({"params": model.local_parameters(), "lr": plan.user_lr, "row_step_cap": plan.user_step_cap})
        if which in ("items", "all"):
            params = model.global_parameters() if plan.train_biases else [model.item_embedding.weight]
            groups.append({"params": params, "lr": plan.lr, "row_step_cap": 0.0})
        trainable = {id(p) for g in groups for p in g["params"]}
        for param in model.parameters():
            param.requires_grad_(id(param) in trainable)
        module: Any = model
        optimizer: Any = LocalSGD(groups)
        criterion: Any = SampledSoftmaxLoss(reduction="sum")
        # 'user': no per-example DP at all (the whole item update is clipped and noised in the secure sum);
        # 'distributed': the item step is clipped per example here, its noise is the device's share in the sum.
        if plan.dp and plan.privacy != "user":
            # A block that trains the user row clips from the per-example gradients it actually applies (hooks),
            # whatever the plan asks: ghost clipping measures norms in one float32 pass and applies a second, and
            # where an example's user-row gradient cancels (a server can send tables that make it) the two
            # leftovers differ, by up to 2.4x C in a review. The user block's dense gradient is one row per device;
            # one block for everything (user-steps = 0) makes it dense over the item tables too (memory.blocks).
            shared_out = plan.privacy == "distributed" and which == "items"
            module, optimizer, criterion = make_private(model, optimizer, criterion, sigma=0.0 if shared_out else sigma,
                                                         clip_norm=plan.clip_norm, mode=block.mode,
                                                         noise_seed=noise_seed + phase)
            if not shared_out:
                optimizer.attach_step_hook(_accounting_hook(new_histories, sigma, plan.sample_rate))
        for _ in range(steps):
            sampled = _sample_step(plan, positives, generators)
            examples_used += np.array([len(s) for s in sampled], dtype=np.int64)
            chunks = max(1, -(-sum(len(s) for s in sampled) // block.chunk))  # an empty batch: one padded chunk
            optimizer.zero_grad(set_to_none=True)
            for chunk, (users, batch_items, batch_weights) in enumerate(
                    _chunks(plan, sampled, positives, weights, generators, n_items, block.chunk)):
                with warnings.catch_warnings():
                    # Opacus's backward hooks see integer ids as inputs; torch warns that they need no gradient.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                    loss = criterion(module(users, batch_items), batch_weights)
                    loss.backward()
                if module is not model and chunk < chunks - 1:
                    # Clip this chunk's examples into the step's sum (p.summed_grad) and free their per-example
                    # gradients; the step's last chunk adds the noise, once (Opacus's virtual steps).
                    optimizer.signal_skip_step(do_skip=True)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            if plan.dp and plan.privacy == "distributed" and which == "items":
                # The step that goes into the secure sum carries no noise here, so its delta is taken as exactly
                # -lr x the clipped gradient sum, in float64: a difference of float32 tables would add rounding
                # that grows with the table values the server sent, beyond the sensitivity lr x C.
                for name, param in (("embedding", model.item_embedding.weight), ("bias", model.item_bias.weight)):
                    step = torch.zeros(param.shape, dtype=torch.float64) if param.grad is None else \
                        -plan.lr * param.grad.detach().double()
                    exact[name] = exact[name] + step if name in exact else step
        if module is not model:
            module.remove_hooks()

    new_users = model.user_values()
    if exact:
        embedding_delta = exact["embedding"].numpy().reshape(k_devices, n_items, items.dim)
        bias_delta = plan.bias_scale * exact["bias"].numpy().reshape(k_devices, n_items) if plan.train_biases \
            else np.zeros((k_devices, n_items))
    else:
        emb = model.item_embedding.weight.detach().numpy().reshape(k_devices, n_items, items.dim)
        embedding_delta = emb - items.embedding[None]
        bias_delta = model.bias_values().reshape(k_devices, n_items) - items.bias[None]
    return CohortUpdate(user_rows=new_users, embedding_delta=embedding_delta, bias_delta=bias_delta,
                        histories=[compact_history(h) for h in new_histories], examples_used=examples_used)


@functools.cache
def pin_allocator(threshold: int = memory.MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation above `threshold` from the OS and give it back when freed (glibc; elsewhere a no-op).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which a chunk's tensors
    come from the heap, whose fragmentation grows with the number of chunks run: measured, the peak of a round grew
    by up to 1.5x from one chunk (small |D|) to a dozen (large |D|). A fixed threshold turns that adjustment off, so
    the peak is the chunk's live tensors, the same for every |D| (tests/test_memory.py). Process-wide, set once.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(memory.M_MMAP_THRESHOLD, threshold))


def _accounting_hook(histories: Sequence[list[HistoryEntry]], sigma: float, sample_rate: float) -> Any:
    """Called by the DP optimizer after each noised step: one step of (sigma, q) for every device.

    (What Opacus's RDPAccountant.step records; its history is all fedrec needs of it, and the epsilon comes from
    shared/privacy/accounting.py. Its module would import all of opacus.optimizers, FSDP optimizers included.)
    """
    def account(_: Any) -> None:
        for history in histories:
            history.append((sigma, sample_rate, 1))

    return account


def make_private(model: MatrixFactorization, optimizer: torch.optim.Optimizer, criterion: SampledSoftmaxLoss,
                 *, sigma: float, clip_norm: float, mode: str, noise_seed: int,
                 loss_reduction: str = "sum", expected_batch_size: float | None = None) -> tuple[Any, Any, Any]:
    """Wrap model, optimizer and loss as Opacus's PrivacyEngine.make_private does, with the server's exact q.

    (make_private derives q from the data loader's length; the server fixes q instead, so
    the same Opacus pieces are assembled here and the devices' histories are stepped with that q.)
    """
    generator = torch.Generator().manual_seed(noise_seed)
    if mode == "ghost":
        # Its module imports all of opacus.optimizers (FSDP included, ~0.2 s): only where ghost clipping is used.
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        module = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction=loss_reduction,
                                                      max_grad_norm=clip_norm, use_ghost_clipping=True)
        dp_optimizer = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=sigma, max_grad_norm=clip_norm,
                                                       expected_batch_size=expected_batch_size,
                                                       loss_reduction=loss_reduction, generator=generator)
        dp_criterion = DPLossFastGradientClipping(module, dp_optimizer, criterion, loss_reduction=loss_reduction)
        return module, dp_optimizer, dp_criterion
    module = GradSampleModule(model, batch_first=True, loss_reduction=loss_reduction)
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=clip_norm,
                               expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                               generator=generator)
    return module, dp_optimizer, criterion


def _sample_step(plan: LocalTrainingPlan, positives: Sequence[torch.Tensor],
                 generators: Sequence[torch.Generator]) -> list[torch.Tensor]:
    """Poisson-sample each device's interactions (rate q): the positions of the sampled ones, per device.

    Each device draws from its own generator, so its stream is independent of the cohort.
    """
    return [torch.nonzero(torch.rand(len(pos), generator=gen) < plan.sample_rate).flatten()
            for pos, gen in zip(positives, generators)]


def _chunks(plan: LocalTrainingPlan, sampled: Sequence[torch.Tensor], positives: Sequence[torch.Tensor],
            weights: Sequence[torch.Tensor], generators: Sequence[torch.Generator], n_items: int,
            size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The step's sampled examples, device after device, in chunks of exactly `size` (users, item ids, weights).

    Each sampled positive gets uniform catalogue negatives, drawn from its device's generator in order (a chunk
    boundary does not change the draws). The last chunk is padded with zero-weight examples (user 0, item 0): their
    loss and so their gradient are exactly zero, and so is their clipped contribution. Every chunk is allocated at
    the same size, whatever the (private) batch size; an empty batch is one chunk of padding.
    """
    width = 1 + plan.num_negatives

    def empty() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.zeros(size, dtype=torch.int64), torch.zeros((size, width), dtype=torch.int64),
                torch.zeros(size, dtype=torch.float32))

    users, items, ws = empty()
    filled, emitted = 0, False
    for k, positions in enumerate(sampled):
        start = 0
        while start < len(positions):
            take = min(size - filled, len(positions) - start)
            chosen, rows = positions[start:start + take], slice(filled, filled + take)
            users[rows] = k
            items[rows, 0] = positives[k][chosen]
            items[rows, 1:] = torch.randint(n_items, (take, plan.num_negatives), generator=generators[k])
            ws[rows] = weights[k][chosen]
            filled, start = filled + take, start + take
            if filled == size:
                yield users, items, ws
                users, items, ws = empty()
                filled, emitted = 0, True
    if filled or not emitted:
        yield users, items, ws


def _seed_int(seed: tuple[int, ...]) -> int:
    return int(np.random.SeedSequence(list(seed)).generate_state(1, dtype=np.uint64)[0] >> 1)

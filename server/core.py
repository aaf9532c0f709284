"""The server's algorithm without transport: initial model, sampling, round plans, aggregation.

Shared by the Flower round loop (server/loop.py) and the plain loop without Flower
(simulation/plain.py), so both run the same federation for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.stats import binom

from fedrec.shared.aggregation import PartialSum, delta_norm
from fedrec.shared.config import AUTO, RunConfig
from fedrec.shared.data.catalogue import Catalogue
from fedrec.shared.model import ItemTables, initial_item_tables
from fedrec.shared.popularity import PopularityPlan, biases_from_counts
from fedrec.shared.privacy.accounting import calibrate_noise_multiplier
from fedrec.shared.training import LocalTrainingPlan

from .aggregation import ServerOptimizer

PARTICIPATION_QUANTILE = 0.9  # 'auto' sigma keeps 90% of devices within budget for the whole run
TRAIN_SALT, EVAL_SALT = 0x7A1, 0xE7A1
POPULARITY_ROUND = 0
PRIOR_BUDGET_SHARE = 0.5  # 'auto' prior noise: the report alone reaches half the budget (RDP composes sub-additively)


def initial_tables(config: RunConfig, catalogue: Catalogue) -> ItemTables:
    return initial_item_tables(catalogue.num_items, config.embedding_dim, scale=config.init_scale, seed=config.seed,
                               categories=catalogue.categories, category_scale=config.category_init)


def sample_devices(device_ids: Iterable[str], count: int, *, seed: int, server_round: int, salt: int,
                   poisson: bool = False) -> list[str]:
    """Devices for a round, seeded by (seed, round) over the sorted ids: reproducible.

    Fixed: exactly `count` (all if fewer), without replacement. Poisson: each device
    independently with rate count / len(devices), as user-level DP amplification assumes.
    """
    devices = sorted(device_ids)
    rng = np.random.default_rng([seed, server_round, salt])
    if poisson:
        rate = min(1.0, count / max(len(devices), 1))
        return [d for d, keep in zip(devices, rng.random(len(devices)) < rate) if keep]
    if count <= 0 or count >= len(devices):
        return devices
    return sorted(devices[i] for i in rng.choice(len(devices), size=count, replace=False))


def popularity_plan(config: RunConfig) -> PopularityPlan | None:
    if not config.popularity_prior:
        return None
    sigma = 0.0
    if config.dp:
        sigma = (float(config.prior_noise_multiplier) if config.prior_noise_multiplier != AUTO else
                 calibrate_noise_multiplier(target_epsilon=PRIOR_BUDGET_SHARE * config.epsilon_budget,
                                            delta=config.delta, sample_rate=1.0, steps=1))
    return PopularityPlan(server_round=POPULARITY_ROUND, dp=config.dp, noise_multiplier=sigma, delta=config.delta)


def noise_multiplier_for(config: RunConfig, population: int) -> float:
    """Sigma of the training rounds: 0 without DP, the configured value, or 'auto' calibrated to the budget.

    'auto': the smallest sigma at which a device sampled in the 90th-percentile number of rounds
    (binomial in rounds x devices-per-round / population) just fits its epsilon budget, after
    the popularity report it makes before training.
    """
    if not config.dp:
        return 0.0
    if config.noise_multiplier != AUTO:
        return float(config.noise_multiplier)
    rate = min(1.0, config.devices_per_round / max(population, 1))
    rounds_joined = max(1, int(binom.ppf(PARTICIPATION_QUANTILE, config.rounds, rate)))
    prior = popularity_plan(config)
    return calibrate_noise_multiplier(target_epsilon=config.epsilon_budget, delta=config.delta,
                                      sample_rate=config.sample_rate, steps=rounds_joined * config.local_steps,
                                      user_steps=rounds_joined * config.user_steps,
                                      user_noise_ratio=config.user_noise_ratio,
                                      fixed_history=prior.privacy_steps() if prior else ())


AUTO_BOUND_EXAMPLES = 256  # clipped examples per step an honest update may carry under 'auto' (beyond: scaled down)
AUTO_BOUND_SIGMAS = 6.0  # how far above its expected norm the DP noise of an honest update may reach


def update_bound(config: RunConfig, plan: LocalTrainingPlan, num_items: int, dim: int) -> float:
    """The L2 bound on one device's item update this round (0 = none).

    'auto' (with DP): an honest update is lr x (sum over steps of clipped example gradients + Gaussian
    noise). Its noise has norm about lr sigma C sqrt(steps x coordinates), with a spread of about
    lr sigma C sqrt(steps / 2); its signal at most lr C steps x the examples sampled. The bound allows
    the noise 6 spreads above its expected norm and `AUTO_BOUND_EXAMPLES` examples per step, so honest
    updates pass unchanged and a poisoned one far above it is rejected (or, from a shard, clipped).
    Without DP nothing bounds an example's gradient, so 'auto' is off.
    """
    if config.delta_clip_norm != AUTO:
        return float(config.delta_clip_norm)
    if not plan.dp:
        return 0.0
    coordinates = num_items * (dim + (1 if plan.train_biases else 0))
    noise = plan.noise_multiplier * (np.sqrt(plan.steps * coordinates) + AUTO_BOUND_SIGMAS * np.sqrt(plan.steps / 2))
    return float(plan.lr * plan.clip_norm * (noise + plan.steps * AUTO_BOUND_EXAMPLES))


def round_plan(config: RunConfig, server_round: int, noise_multiplier: float) -> LocalTrainingPlan:
    return LocalTrainingPlan(server_round=server_round, lr=config.local_lr, user_lr=config.user_lr,
                             user_step_cap=config.user_step_cap, user_scale=config.user_scale,
                             bias_scale=config.bias_scale, train_biases=config.train_biases,
                             steps=config.local_steps, user_steps=config.user_steps,
                             user_noise_multiplier=config.user_noise_ratio * noise_multiplier if config.dp else 0.0,
                             sample_rate=config.sample_rate, num_negatives=config.num_negatives, dp=config.dp,
                             noise_multiplier=noise_multiplier if config.dp else 0.0, clip_norm=config.clip_norm,
                             delta=config.delta, grad_sample_mode=config.grad_sample_mode)


class ItemModelServer:
    """The global item tables, the optimizer that applies each round's mean delta, and the known noise.

    With FedAvg the DP noise in the item embeddings is a sum of known Gaussians, so its variance
    per coordinate is tracked exactly; ranking uses the embeddings shrunk by that variance
    (James-Stein, per item), which is post-processing of the private model.
    """

    def __init__(self, config: RunConfig, tables: ItemTables) -> None:
        self.config = config
        self.tables = tables
        self.optimizer = ServerOptimizer(config.server_optimizer, lr=config.effective_server_lr, beta1=config.server_beta1,
                                         beta2=config.server_beta2, tau=config.server_tau)
        self.noise_variance = 0.0  # per embedding coordinate, accumulated over rounds (nan: unknown)

    def set_popularity(self, parts: list[tuple[np.ndarray, int]], *, noise_multiplier: float) -> None:
        """Item biases from the nodes' (sum of noisy reports, number of reports), added in the order given."""
        if not parts:
            return
        total = np.sum(np.stack([counts.astype(np.float64) for counts, _ in parts]), axis=0)
        reports = sum(count for _, count in parts)
        self.tables = ItemTables(embedding=self.tables.embedding,
                                 bias=biases_from_counts(total, reports=reports, noise_multiplier=noise_multiplier))

    def apply(self, total: PartialSum, plan: LocalTrainingPlan) -> dict[str, float]:
        """Apply the round: the mean of the (already clipped) updates, central noise if configured, the optimizer.

        Returns what happened: the mean delta's norm and how many updates the clip shortened.
        """
        if total.count == 0:
            return {"mean_delta_norm": float("nan"), "clipped": 0}
        mean = total.mean()
        central_std = 0.0
        if self.config.central_noise_multiplier > 0:
            # User-level DP: N(0, (z S)^2) on the sum of clipped updates, i.e. (z S / n) on their mean.
            central_std = self.config.central_noise_multiplier * float(self.config.delta_clip_norm) / total.count
            rng = np.random.default_rng([self.config.seed, plan.server_round, 0xCE27])
            mean = ((mean[0] + rng.normal(0.0, central_std, mean[0].shape)).astype(np.float32),
                    (mean[1] + rng.normal(0.0, central_std, mean[1].shape)).astype(np.float32))
        self.tables = self.optimizer.apply(self.tables, mean)
        if self.optimizer.kind == "fedavg":
            step_noise = self.optimizer.lr * plan.lr * plan.noise_multiplier * plan.clip_norm
            self.noise_variance += step_noise**2 * plan.steps / total.count + (self.optimizer.lr * central_std) ** 2
        else:
            self.noise_variance = float("nan")
        return {"mean_delta_norm": delta_norm(mean), "clipped": total.clipped}

    def serving_tables(self) -> ItemTables:
        """The tables devices rank with: embeddings shrunk toward zero by their known noise (if enabled)."""
        if not self.config.ranking_shrinkage or not self.noise_variance > 0:
            return self.tables
        return shrink_embeddings(self.tables, self.noise_variance)


def shrink_embeddings(tables: ItemTables, noise_variance: float) -> ItemTables:
    """Positive-part James-Stein per item row: factor 1 - dim * var / |q_i|^2, floored at 0."""
    emb = tables.embedding.astype(np.float64)
    norms = np.sum(emb**2, axis=1)
    factor = np.clip(1.0 - tables.dim * noise_variance / np.maximum(norms, 1e-12), 0.0, 1.0)
    return ItemTables(embedding=(emb * factor[:, None]).astype(np.float32), bias=tables.bias)

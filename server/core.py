"""The server's algorithm without transport: initial model, sampling, round plans, aggregation.

Shared by the Flower round loop (server/loop.py) and the plain loop without Flower
(simulation/plain.py), so both run the same federation for the same seed.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from fedrec.shared.aggregation import PartialSum, delta_norm
from fedrec.shared.config import AUTO, AUTO_SERVER_LR_SECURE, SECURE_MODES, ConfigError, RunConfig
from fedrec.shared.distributed_dp import accounted_multiplier, multiplier_for_accounted
from fedrec.shared.data.catalogue import Catalogue
from fedrec.shared.model import ItemTables, initial_item_tables
from fedrec.shared.head import NoisyPrior, fill_tail, head_digest, select_head
from fedrec.shared.popularity import PopularityPlan, biases_from_counts
from fedrec.shared.privacy.accounting import calibrate_noise_multiplier
from fedrec.shared.plans import LocalTrainingPlan

from .aggregation import ServerOptimizer


PARTICIPATION_QUANTILE = 0.9  # 'auto' sigma keeps 90% of devices within budget for the whole run
TRAIN_SALT, EVAL_SALT, CENTRAL_NOISE_SALT = 0x7A1, 0xE7A1, 0xCE27
POPULARITY_ROUND = 0
# 'auto' prior noise: the report alone reaches half the budget (RDP composes sub-additively), in every mode. The
# noisy prior ranks the catalogue's tail and chooses the trained head (shared/head.py), so it earns its share: on
# MovieLens latest-small (user level, epsilon 8, seed 42) the prior alone ranked at HR@10 0.016 with a fifth of the
# budget and 0.034 with half, and with the head the model reached 0.048 against 0.015 (docs/results.md).
PRIOR_BUDGET_SHARE = 0.5


def initial_tables(config: RunConfig, catalogue: Catalogue) -> ItemTables:
    return initial_item_tables(catalogue.num_items, config.embedding_dim, scale=config.init_scale, seed=config.seed,
                               categories=catalogue.categories, category_scale=config.category_init)


@dataclass(frozen=True)
class ServerRandomness:
    """Where the server's privacy-relevant random numbers (central noise, device sampling) come from.

    Seeded (simulation): one generator per (seed, round, attempt, salt), reproducible, and exactly
    as secret as config.json, which holds the seed; whoever reads it can subtract the central noise
    and knows who was sampled, so neither the noise nor the sampling amplification holds against them.
    OS entropy (deployment): 128 fresh bits from the OS (`secrets`) for every generator, so nothing in
    the run directory determines them. Either way every attempt of a round (a round re-run after a
    resume) gets its own generator, so no noise is ever reused.
    """

    seed: int | None  # None: OS entropy

    @classmethod
    def seeded(cls, seed: int) -> ServerRandomness:
        return cls(int(seed))

    @classmethod
    def from_os(cls) -> ServerRandomness:
        return cls(None)

    @classmethod
    def for_grid(cls, grid: object, seed: int) -> ServerRandomness:
        """Seeded only on Flower's in-memory simulation grid (`flwr simulate`/`run_simulation`); any other grid
        (a deployment's HttpGrid to the SuperLink) gets OS entropy, so an unknown grid fails safe."""
        from .registry import grid_is_simulated  # Flower stays out of the plain loop's import path

        return cls.seeded(seed) if grid_is_simulated(grid) else cls.from_os()

    @property
    def reproducible(self) -> bool:
        return self.seed is not None

    def for_round(self, server_round: int, attempt: int, salt: int) -> np.random.Generator:
        if server_round < 0 or attempt < 0 or salt < 0:
            raise ValueError(f"round {server_round}, attempt {attempt}, salt {salt}: must be >= 0")
        if self.seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng([self.seed, server_round, attempt, salt])

    def describe(self) -> str:
        if self.seed is None:
            return ("OS entropy (128 fresh bits per round attempt): not reproducible, not derivable from the run "
                    "directory")
        return (f"seeded from config seed {self.seed}: reproducible, not secret (whoever has config.json can "
                "recompute the central noise and the device sampling)")


def sample_devices(device_ids: Iterable[str], count: int, *, rng: np.random.Generator,
                   poisson: bool = False) -> list[str]:
    """Devices for a round, drawn with `rng` over the sorted ids.

    Fixed: exactly `count` (all if fewer), without replacement. Poisson: each device
    independently with rate count / len(devices), as user-level DP amplification assumes.
    `rng`: the round attempt's generator (ServerRandomness.for_round).
    """
    devices = sorted(device_ids)
    if poisson:
        rate = min(1.0, count / max(len(devices), 1))
        return [d for d, keep in zip(devices, rng.random(len(devices)) < rate) if keep]
    if count <= 0 or count >= len(devices):
        return devices
    return sorted(devices[i] for i in rng.choice(len(devices), size=count, replace=False))


def central_denominator(config: RunConfig, population: int) -> int:
    """The fixed denominator of the mean under central noise: devices-per-round, capped by the population.

    It is the expected (Poisson) or exact (fixed) sample size, set before anyone trains, so a device's
    influence on the mean is S / D whoever declines or fails.
    """
    return max(1, min(int(config.devices_per_round), int(population)))


def popularity_plan(config: RunConfig) -> PopularityPlan | None:
    if not config.popularity_prior:
        return None
    sigma = 0.0
    if config.dp:
        sigma = (float(config.prior_noise_multiplier) if config.prior_noise_multiplier != AUTO else
                 calibrate_noise_multiplier(target_epsilon=PRIOR_BUDGET_SHARE * config.epsilon_budget,
                                            delta=config.delta, sample_rate=1.0, steps=1,
                                            exact_gaussian=config.privacy not in SECURE_MODES))
    secure = config.privacy in SECURE_MODES
    if secure and config.prior_noise_multiplier == AUTO:
        sigma = multiplier_for_accounted(sigma)  # the quantised secure sum: sigma must hold after the grid's cost
    return PopularityPlan(server_round=POPULARITY_ROUND, dp=config.dp, noise_multiplier=sigma, delta=config.delta,
                          privacy=config.privacy if secure else "local")


def noise_multiplier_for(config: RunConfig, population: int) -> float:
    """Sigma of the training rounds: 0 without DP, the configured value, or 'auto' calibrated to the budget.

    Raises ConfigError (naming the fields) where no sigma fits: the fixed releases alone spend the budget.
    """
    try:
        return _noise_multiplier_for(config, population)
    except ValueError as err:
        raise ConfigError(f"noise-multiplier=auto cannot fit epsilon-budget={config.epsilon_budget} "
                          f"(prior-noise-multiplier={config.prior_noise_multiplier}, federated-eval="
                          f"{config.federated_eval}, rounds={config.rounds}): {err}; raise the budget or the "
                          "prior's noise, or set noise-multiplier") from None


def _noise_multiplier_for(config: RunConfig, population: int) -> float:
    """noise_multiplier_for's calibration (ValueError where it cannot fit).

    'auto': the smallest sigma at which a device sampled in the 90th-percentile number of rounds
    (binomial in rounds x devices-per-round / population) just fits its epsilon budget, after
    the popularity report it makes before training and the evaluation releases it makes (federated-eval).
    """
    if not config.dp:
        return 0.0
    if config.noise_multiplier != AUTO:
        return float(config.noise_multiplier)
    rate = min(1.0, config.devices_per_round / max(population, 1))
    rounds_joined = max(1, int(binom.ppf(PARTICIPATION_QUANTILE, config.rounds, rate)))
    prior = popularity_plan(config)
    releases = evaluation_releases(config, population)
    fixed = [*(prior.privacy_steps() if prior else ()),
             *([(config.eval_noise_multiplier, 1.0, releases)] if releases else [])]
    if config.privacy in SECURE_MODES:
        # One release into the sum per round joined, accounted at q = 1 (no amplification: the server chose the
        # sample); distributed also takes the user-row steps (local noise, q = 1 here: conservative).
        if prior is not None and prior.dp:  # the report is a secure sum too: its accounted multiplier
            fixed = [(accounted_multiplier(prior.noise_multiplier, 1.0), 1.0, 1), *fixed[1:]]
        user_steps = rounds_joined * config.user_steps if config.privacy == "distributed" else 0
        target = calibrate_noise_multiplier(target_epsilon=config.epsilon_budget, delta=config.delta, sample_rate=1.0,
                                            steps=rounds_joined, user_steps=user_steps,
                                            user_noise_ratio=config.user_noise_ratio, fixed_history=fixed)
        return multiplier_for_accounted(target)
    return calibrate_noise_multiplier(target_epsilon=config.epsilon_budget, delta=config.delta,
                                      sample_rate=config.sample_rate, steps=rounds_joined * config.local_steps,
                                      user_steps=rounds_joined * config.user_steps,
                                      user_noise_ratio=config.user_noise_ratio, fixed_history=fixed,
                                      exact_gaussian=True)  # local mode: as devices account (gaussian_record)


def evaluation_releases(config: RunConfig, population: int) -> int:
    """Evaluation releases a device makes at the participation quantile (0 without federated-eval or DP).

    The evaluations every eval-every rounds sample eval-devices of the population; the final one may ask
    anyone, so it is counted for every device.
    """
    if not (config.federated_eval and config.dp):
        return 0
    middle = sum(1 for r in range(1, config.rounds) if r % config.eval_every == 0)
    rate = 1.0 if config.eval_devices == 0 else min(1.0, config.eval_devices / max(population, 1))
    return int(binom.ppf(PARTICIPATION_QUANTILE, middle, rate)) + 1


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


def trained_head(config: RunConfig, prior: NoisyPrior | None, num_items: int) -> np.ndarray | None:
    """The item ids that train, from the noisy prior and public settings alone (None: all; shared/head.py)."""
    size = None if config.trained_items == AUTO else int(config.trained_items)
    return select_head(prior, num_items, size=size, z=config.head_z)


def round_plan(config: RunConfig, server_round: int, noise_multiplier: float,
               head: np.ndarray | None = None) -> LocalTrainingPlan:
    return LocalTrainingPlan(head_size=0 if head is None else len(head), head_sha256=head_digest(head),server_round=server_round, lr=config.local_lr, user_lr=config.user_lr,
                             user_step_cap=config.user_step_cap, user_scale=config.user_scale,
                             bias_scale=config.bias_scale, train_biases=config.train_biases,
                             steps=config.local_steps, user_steps=config.user_steps,
                             user_noise_multiplier=config.user_noise_ratio * noise_multiplier
                             if config.dp and config.privacy != "user" else 0.0,
                             sample_rate=config.sample_rate, num_negatives=config.num_negatives, dp=config.dp,
                             noise_multiplier=noise_multiplier if config.dp else 0.0, clip_norm=config.clip_norm,
                             delta=config.delta, grad_sample_mode=config.grad_sample_mode,
                             privacy=config.privacy if config.privacy in SECURE_MODES else "local",
                             update_clip=float(config.delta_clip_norm) if config.privacy == "user" else 0.0)


SECURE_TABLE_NOISE = 0.04  # 'auto' server lr in the secure modes: noise std per table coordinate and round


def secure_server_lr(config: RunConfig, noise_multiplier: float, population: int) -> float | None:
    """'auto' server learning rate of the distributed and user modes, or None where it does not apply.

    The sum carries the noise once, so the rate follows it: the largest rate (up to the no-DP rate) at which the
    mean's noise, times the rate, adds at most SECURE_TABLE_NOISE per coordinate and round. The mean's noise std
    is z x sensitivity / D (sensitivity lr x C, or S in 'user'; D the fixed denominator). Measured on MovieLens
    latest-small (README, Results; one seed): at epsilon 8 a rate of 1.34-1.5 beat 3.0, at epsilon 4 1.5 beat 0.74.
    """
    if config.server_lr != AUTO or config.privacy not in SECURE_MODES or noise_multiplier <= 0:
        return None
    sensitivity = float(config.delta_clip_norm) if config.privacy == "user" else config.local_lr * config.clip_norm
    mean_noise = noise_multiplier * sensitivity / central_denominator(config, population)
    return min(AUTO_SERVER_LR_SECURE, SECURE_TABLE_NOISE / mean_noise)


class ItemModelServer:
    """The global item tables, the optimizer that applies each round's mean delta, and the known noise.

    With FedAvg the DP noise in the item embeddings is a sum of known Gaussians, so its variance
    per coordinate is tracked exactly; ranking uses the embeddings shrunk by that variance
    (James-Stein, per item), which is post-processing of the private model.
    """

    def __init__(self, config: RunConfig, tables: ItemTables, categories: list[str] | None = None) -> None:
        self.config = config
        self.tables = tables
        self.categories = categories  # public: the tail of the catalogue ranks by its category's trained rows
        self.head: np.ndarray | None = None  # the item ids that train (None: all), set from the noisy prior
        self.optimizer = ServerOptimizer(config.server_optimizer, lr=config.effective_server_lr, beta1=config.server_beta1,
                                         beta2=config.server_beta2, tau=config.server_tau)
        self.noise_variance = 0.0  # per embedding coordinate, accumulated over rounds (nan: unknown)
        # The released (noisy) popularity sum and its noise std per item: what the trained head is chosen from.
        self.prior: NoisyPrior | None = None

    def set_popularity(self, parts: list[tuple[np.ndarray, int]], *, noise_multiplier: float) -> None:
        """Item biases from the nodes' (sum of noisy reports, number of reports), added in the order given."""
        if not parts:
            return
        total = np.sum(np.stack([counts.astype(np.float64) for counts, _ in parts]), axis=0)
        reports = sum(count for _, count in parts)
        self.set_prior(NoisyPrior(total, noise_std=noise_multiplier * math.sqrt(reports), reports=reports))
        self.tables = ItemTables(embedding=self.tables.embedding,
                                 bias=biases_from_counts(total, reports=reports, noise_multiplier=noise_multiplier))

    def set_prior(self, prior: NoisyPrior, head: np.ndarray | None = None) -> None:
        """Keep the released prior and choose the head from it (or take `head`, as a checkpoint recorded it)."""
        self.prior = prior
        self.head = trained_head(self.config, prior, self.tables.num_items) if head is None else head

    def training_tables(self) -> ItemTables:
        """The rows a round trains: the head's (what devices' updates and the server's sums are shaped as)."""
        return self.tables.take(self.head)

    def scatter(self, embedding: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A mean delta over the head's rows as a delta of the whole tables (zero outside the head)."""
        if self.head is None:
            return embedding, bias
        full_emb = np.zeros(self.tables.embedding.shape, dtype=embedding.dtype)
        full_bias = np.zeros(self.tables.bias.shape, dtype=bias.dtype)
        full_emb[self.head], full_bias[self.head] = embedding, bias
        return full_emb, full_bias

    def apply(self, total: PartialSum, plan: LocalTrainingPlan, *, rng: np.random.Generator,
              population: int) -> dict[str, float | None]:
        """Apply the round: the mean of the (already clipped) updates, central noise if configured, the optimizer.

        Without central noise the mean is over the updates received. With it (user-level DP, see
        server/user_privacy.py) the round releases (sum + N(0, (z S)^2)) / D with D = central_denominator(...)
        fixed in advance: dividing by the realised count would make the scale of every update depend on who
        trained. The noise is released even when nobody trained, so that event is not revealed either.
        `rng`: the round attempt's generator (ServerRandomness.for_round(round, attempt, CENTRAL_NOISE_SALT)).
        Returns what happened: the mean delta's norm and how many updates the clip shortened.
        """
        central = self.config.central_noise_multiplier > 0
        if total.count == 0 and not central:
            return {"mean_delta_norm": None, "clipped": 0}  # nothing trained: no norm (null in metrics.jsonl)
        step_noise = self.optimizer.lr * plan.lr * plan.noise_multiplier * plan.clip_norm
        if central:
            denominator = central_denominator(self.config, population)
            sum_std = self.config.central_noise_multiplier * float(self.config.delta_clip_norm)
            mean = tuple(((part + rng.normal(0.0, sum_std, part.shape)) / denominator).astype(np.float32)
                         for part in (total.embedding, total.bias))
            # local DP noise of `count` devices summed, over D; plus the central noise over D
            variance = (step_noise**2 * plan.steps * total.count + (self.optimizer.lr * sum_std) ** 2) / denominator**2
        else:
            mean = total.mean()
            variance = step_noise**2 * plan.steps / total.count
        self.tables = self.optimizer.apply(self.tables, self.scatter(*mean))
        self.noise_variance = self.noise_variance + variance if self.optimizer.kind == "fedavg" else float("nan")
        return {"mean_delta_norm": delta_norm(mean), "clipped": total.clipped}

    def follow_noise(self, noise_multiplier: float, population: int) -> None:
        """Set the 'auto' server rate of a secure mode from the round noise (secure_server_lr)."""
        lr = secure_server_lr(self.config, noise_multiplier, population)
        if lr is not None:
            self.optimizer.lr = lr

    def set_popularity_from_sum(self, total: np.ndarray, *, reports: int, noise_std: float) -> None:
        """Item biases from a secure sum of `reports` indicators whose noise has std `noise_std` per item."""
        self.set_prior(NoisyPrior(np.asarray(total, dtype=np.float64), noise_std=noise_std, reports=reports))
        self.tables = ItemTables(embedding=self.tables.embedding,
                                 bias=biases_from_counts(total, reports=reports,
                                                         noise_multiplier=noise_std / np.sqrt(max(reports, 1))))

    def apply_sum(self, embedding: np.ndarray, bias: np.ndarray, *, shares: int, noise_std: float,
                  population: int) -> dict[str, float | None]:
        """Apply a secure sum of `shares` updates (noise std `noise_std` per coordinate, already in it) as a mean
        over the fixed denominator D (central_denominator): who declined or dropped does not rescale it."""
        denominator = central_denominator(self.config, population)
        mean = ((embedding / denominator).astype(np.float32), (bias / denominator).astype(np.float32))
        self.tables = self.optimizer.apply(self.tables, self.scatter(*mean))
        variance = (self.optimizer.lr * noise_std / denominator) ** 2
        self.noise_variance = self.noise_variance + variance if self.optimizer.kind == "fedavg" else float("nan")
        return {"mean_delta_norm": delta_norm(mean), "clipped": None, "shares": shares}

    def serving_tables(self) -> ItemTables:
        """The tables devices rank with: embeddings shrunk toward zero by their known noise (if enabled); outside a
        trained head, each row the mean trained row of its category (shared/head.py fill_tail)."""
        tables = self.tables
        if self.config.ranking_shrinkage and self.noise_variance > 0:
            tables = shrink_embeddings(tables, self.noise_variance)
        if self.head is None:
            return tables
        return ItemTables(embedding=fill_tail(tables.embedding, self.head, self.categories).astype(np.float32),
                          bias=tables.bias)


def shrink_embeddings(tables: ItemTables, noise_variance: float) -> ItemTables:
    """Positive-part James-Stein per item row: factor 1 - dim * var / |q_i|^2, floored at 0."""
    emb = tables.embedding.astype(np.float64)
    norms = np.sum(emb**2, axis=1)
    factor = np.clip(1.0 - tables.dim * noise_variance / np.maximum(norms, 1e-12), 0.0, 1.0)
    return ItemTables(embedding=(emb * factor[:, None]).astype(np.float32), bias=tables.bias)


def popularity_groups(asked: dict[int, list[str]], size: int) -> list[dict[int, list[str]]]:
    """The devices of a secure popularity round cut into sums of `size` devices (in the order of the nodes' first
    device, then each node's own order); a remainder under size / 2 joins the last sum, a larger one is a sum of its
    own. A node hosting many devices (cohort engine) may be asked for its devices in several sums: a sum's t stays
    that of a training round (within what devices accept, `max-aggregation-threshold`), however devices are spread
    over nodes."""
    size = max(1, size)
    ordered = [(node, device) for node in sorted(asked, key=lambda n: asked[n][0]) for device in asked[node]]
    cuts = [ordered[start:start + size] for start in range(0, len(ordered), size)]
    if len(cuts) > 1 and len(cuts[-1]) < size / 2:
        cuts[-2].extend(cuts.pop())  # a small remainder joins the last sum rather than forming a weak one
    groups = []
    for cut in cuts:
        group: dict[int, list[str]] = {}
        for node, device in cut:
            group.setdefault(node, []).append(device)
        groups.append(group)
    return groups


def secure_threshold(config: RunConfig, asked: dict[int, list[str]]) -> tuple[int, int]:
    """(t, c) of a secure sum over the devices asked: t = ceil(aggregation-threshold x count), at least 2 where
    possible (a sum of one device is that device's update); c = the colluders setting ('auto': ceil(t / 10), what
    a device's default policy assumes), below t."""
    count = sum(len(devices) for devices in asked.values())
    t = max(min(2, count), math.ceil(config.aggregation_threshold * count - 1e-9))
    c = math.ceil(t / 10) if config.colluders == "auto" else int(config.colluders)
    return t, min(c, max(t - 1, 0))

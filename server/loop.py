"""The federated round loop.

Round r:
  1. sample `devices-per-round` known devices, seeded by (seed, r);
  2. send each the item tables and the round plan (lr, steps, q, sigma, C, delta);
  3. sort the replies: trained (validated delta), declined (budget), rejected (bad reply), failed;
  4. append the round to the privacy ledger (before aggregating: devices spent epsilon either way);
  5. apply the uniform mean delta with the server optimizer and write a checkpoint;
  6. every `eval-every` rounds, and after the last, evaluate on devices and append metrics.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from scipy.stats import binom

from shared import protocol as P
from shared.config import AUTO, RunConfig
from shared.model import ItemTables
from shared.privacy.accounting import calibrate_noise_multiplier
from shared.training import LocalTrainingPlan

from .aggregation import ServerOptimizer, mean_delta
from .records import LEDGER, METRICS, Checkpoint, RunRecords
from .registry import DeviceRegistry
from .replies import EvalReplies, sort_eval_replies, sort_train_replies

log = logging.getLogger("fedrec.server")
PARTICIPATION_QUANTILE = 0.9  # 'auto' sigma keeps 90% of devices within budget for the whole run


@dataclass
class FederationResult:
    tables: ItemTables
    noise_multiplier: float
    final_eval: dict[str, float]
    devices: int


def auto_noise_multiplier(config: RunConfig, population: int) -> float:
    """Sigma at which a device sampled in the 90th-percentile number of rounds just fits its budget."""
    rate = min(1.0, config.devices_per_round / max(population, 1))
    rounds_joined = max(1, int(binom.ppf(PARTICIPATION_QUANTILE, config.rounds, rate)))
    return calibrate_noise_multiplier(target_epsilon=config.epsilon_budget, delta=config.delta,
                                      sample_rate=config.sample_rate, steps=rounds_joined * config.local_steps)


def round_plan(config: RunConfig, server_round: int, noise_multiplier: float) -> LocalTrainingPlan:
    return LocalTrainingPlan(server_round=server_round, lr=config.local_lr, user_lr=config.user_lr,
                             steps=config.local_steps, sample_rate=config.sample_rate,
                             num_negatives=config.num_negatives, dp=config.dp,
                             noise_multiplier=noise_multiplier if config.dp else 0.0, clip_norm=config.clip_norm,
                             delta=config.delta, grad_sample_mode=config.grad_sample_mode)


def _tables_record(tables: ItemTables) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in P.tables_to_arrays(tables).items()})


class Federation:
    def __init__(self, grid: Grid, config: RunConfig, records: RunRecords, *, expected_devices: int,
                 initial_tables: ItemTables) -> None:
        self.grid, self.config, self.records = grid, config, records
        self.registry = DeviceRegistry(grid, hello_timeout=config.round_timeout)
        self.expected_devices = expected_devices
        self.optimizer = ServerOptimizer(config.server_optimizer, lr=config.server_lr, beta1=config.server_beta1,
                                         beta2=config.server_beta2, tau=config.server_tau)
        self.tables = initial_tables
        self.first_round = 1
        self.noise_multiplier = math.nan

    def run(self) -> FederationResult:
        cfg = self.config
        self.registry.wait_for(self.expected_devices, timeout=cfg.node_wait_timeout)
        self.registry.refresh()
        self._restore_or_start()
        log.info("federation: %d devices, rounds %d..%d, %d per round, dp=%s sigma=%.4f", len(self.registry.node_of),
                 self.first_round, cfg.rounds, cfg.devices_per_round, cfg.dp, self.noise_multiplier)
        for server_round in range(self.first_round, cfg.rounds + 1):
            self._train_round(server_round)
            if server_round % cfg.eval_every == 0 and server_round != cfg.rounds:
                self._evaluate(server_round, cfg.eval_devices, final=False)
        final = self._evaluate(cfg.rounds, cfg.final_eval_devices, final=True) if self.first_round <= cfg.rounds \
            else {}
        return FederationResult(tables=self.tables, noise_multiplier=self.noise_multiplier, final_eval=final,
                                devices=len(self.registry.node_of))

    def _restore_or_start(self) -> None:
        checkpoint = self.records.load_checkpoint()
        if checkpoint is not None:
            self.tables = checkpoint.tables
            self.optimizer.load_state_dict(checkpoint.optimizer_state)
            self.noise_multiplier = checkpoint.noise_multiplier
            self.first_round = checkpoint.server_round + 1
            log.info("resuming after round %d from %s", checkpoint.server_round, self.records.path)
            return
        if not self.config.dp:
            self.noise_multiplier = 0.0
        elif self.config.noise_multiplier == AUTO:
            self.noise_multiplier = auto_noise_multiplier(self.config, len(self.registry.node_of))
        else:
            self.noise_multiplier = float(self.config.noise_multiplier)

    def _train_round(self, server_round: int) -> None:
        cfg = self.config
        started = time.monotonic()
        self.registry.refresh()
        rng = np.random.default_rng([cfg.seed, server_round, 0x7A1])
        chosen = self.registry.sample(cfg.devices_per_round, rng)
        plan = round_plan(cfg, server_round, self.noise_multiplier)
        content = RecordDict({P.TABLES: _tables_record(self.tables), P.PLAN: ConfigRecord(plan.to_config())})
        asked = {self.registry.node_of[d]: d for d in chosen}
        messages = [Message(content, dst_node_id=node, message_type="train") for node in asked]
        replies = sort_train_replies(self.grid.send_and_receive(messages, timeout=cfg.round_timeout), asked,
                                     self.tables, dp=cfg.dp, epsilon_budget=cfg.epsilon_budget)
        self.records.append(LEDGER, {
            "round": server_round, "time": time.time(), "plan": plan.to_config(),
            "asked": sorted(asked.values()), "trained": sorted(replies.updates), "declined": sorted(replies.declined),
            "rejected": replies.rejected, "failed": replies.failed,
            "epsilon_reported": {d: replies.epsilon[d] for d in sorted(replies.epsilon)},
        })
        update_norm = math.nan
        if replies.updates:
            delta = mean_delta(list(replies.updates.values()))
            update_norm = float(np.sqrt(np.sum(delta[0].astype(np.float64) ** 2) + np.sum(delta[1] ** 2)))
            self.tables = self.optimizer.apply(self.tables, delta)
        self.records.save_checkpoint(Checkpoint(server_round=server_round, tables=self.tables,
                                                optimizer_state=self.optimizer.state_dict(),
                                                noise_multiplier=self.noise_multiplier))
        eps = list(replies.epsilon.values())
        line = {"round": server_round, "seconds": round(time.monotonic() - started, 3),
                "trained": len(replies.updates), "declined": len(replies.declined),
                "rejected": len(replies.rejected), "failed": len(replies.failed),
                "epsilon_max_reported": max(eps) if eps else 0.0, "mean_delta_norm": update_norm}
        self.records.append(METRICS, {"kind": "train", **line})
        log.info("round %d/%d: %d trained, %d declined, %d rejected, %d failed, eps max %.3f (%.1fs)",
                 server_round, cfg.rounds, line["trained"], line["declined"], line["rejected"], line["failed"],
                 line["epsilon_max_reported"], line["seconds"])

    def _evaluate(self, server_round: int, count: int, *, final: bool) -> dict[str, float]:
        cfg = self.config
        started = time.monotonic()
        self.registry.refresh()
        rng = np.random.default_rng([cfg.seed, server_round, 0xE7A1])
        chosen = self.registry.sample(count if count > 0 else len(self.registry.node_of), rng)
        settings = {"server-round": server_round, "target": "test", "refit-l2": cfg.refit_l2, "sampled-seed": cfg.seed}
        content = RecordDict({P.TABLES: _tables_record(self.tables), P.EVAL: ConfigRecord(settings)})
        asked = {self.registry.node_of[d]: d for d in chosen}
        messages = [Message(content, dst_node_id=node, message_type="evaluate") for node in asked]
        replies = sort_eval_replies(self.grid.send_and_receive(messages, timeout=cfg.round_timeout), asked)
        metrics = average_metrics(replies)
        self.records.append(METRICS, {"kind": "final_evaluate" if final else "evaluate", "round": server_round,
                                      "seconds": round(time.monotonic() - started, 3), **metrics})
        log.info("evaluation after round %d on %d devices: hr@10 %.4f ndcg@10 %.4f recall@20 %.4f", server_round,
                 metrics["devices"], metrics.get("hr@10", math.nan), metrics.get("ndcg@10", math.nan),
                 metrics.get("recall@20", math.nan))
        return metrics


def average_metrics(replies: EvalReplies) -> dict[str, Any]:
    keys = sorted({k for m in replies.metrics.values() for k in m})
    out: dict[str, Any] = {k: float(np.mean([m[k] for m in replies.metrics.values() if k in m])) for k in keys}
    out.update(devices=len(replies.metrics), rejected=len(replies.rejected), failed=len(replies.failed))
    return out

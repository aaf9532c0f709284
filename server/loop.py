"""The federated round loop.

Round 0 (with the popularity prior): every device reports its items once with Gaussian noise;
the sum sets the item biases.
Round r >= 1:
  1. sample `devices-per-round` known devices (seeded by (seed, r, attempt) in a simulation, from OS
     entropy in a deployment);
  2. write the round's plan and the devices asked to the privacy ledger, flushed to disk, before
     anything is sent (write-ahead: a crash after this leaves the round charged in the audit);
  3. send each node hosting some of them the item tables, the round plan (lr, steps, q, sigma,
     C, delta), the names of its devices to train and the attempt's nonce (a round run again
     draws fresh noise); requests expire after round-timeout, so a device that comes back late
     does not train (and spend epsilon) for a round already closed;
  4. sort the replies: trained (validated sum of clipped deltas), refused (the device's own
     policy), declined (budget), rejected (bad reply), failed;
  5. append the round's outcome to the ledger (before aggregating: devices spent epsilon either way);
  6. apply the uniform mean delta with the server optimizer and write a checkpoint;
  7. with federated-eval, every `eval-every` rounds and after the last, ask devices for their
     noised metrics (a release charged to their budgets, ledgered like a round) and append them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedrec.shared import protocol as P
from fedrec.shared.aggregation import PartialSum
from fedrec.shared.config import SECURE_MODES, ConfigError, RunConfig
from fedrec.shared.distributed_dp import SumMechanism
from fedrec.shared.plans import LocalTrainingPlan
from fedrec.shared.popularity import PopularityPlan
from fedrec.shared.secure_release import popularity_mechanism, split_update, training_mechanism
from fedrec.shared.eval_release import RELEASED_METRICS, EvaluationPlan
from fedrec.shared.model import ItemTables
from fedrec.shared.policy import simulated_policy

from .core import (
    CENTRAL_NOISE_SALT,
    EVAL_SALT,
    POPULARITY_ROUND,
    TRAIN_SALT,
    ItemModelServer,
    ServerRandomness,
    noise_multiplier_for,
    popularity_groups,
    popularity_plan,
    round_plan,
    secure_threshold,
    sample_devices,
    update_bound,
)
from .central_eval import CentralEvaluation
from .exchange import send_and_receive
from .records import LEDGER, METRICS, Checkpoint, RunRecords
from .registry import DeviceRegistry, grid_is_simulated
from .replies import (Asked, TrainReplies, sort_eval_replies, sort_grid_replies, sort_popularity_replies,
                      sort_train_replies)
from .user_privacy import central_record, popularity_record

log = logging.getLogger("fedrec.server")


@dataclass
class FederationResult:
    tables: ItemTables
    noise_multiplier: float
    final_eval: dict[str, float]
    devices: int
    stopped: str = ""  # why the run ended before its last round ('' = it did not)
    warnings: list[str] = field(default_factory=list)  # what the operator should know (summary.json 'warnings')


class TooFewDevices(RuntimeError):
    """Fewer devices online than `min-devices`, even after waiting `node-wait-timeout`."""


class Interrupted(RuntimeError):
    """The operator asked the run to stop (Ctrl-C); `last_round` is the round of the last checkpoint."""

    def __init__(self, message: str, *, last_round: int) -> None:
        super().__init__(message)
        self.last_round = last_round


# Set by `fedrec simulate`'s Ctrl-C handler (simulation/runner.py), read by the loop between rounds: a signal is
# process-wide, and the loop runs in Flower's server thread, which signal handlers never run in.
STOP_REQUESTED = threading.Event()


def _cohort(devices: list[str], *, nonce: int, delta_clip: float = 0.0) -> ConfigRecord:
    return ConfigRecord({P.DEVICE_IDS: devices, P.DELTA_CLIP: delta_clip, P.NONCE: nonce})


def _tables_record(tables: ItemTables) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in P.tables_to_arrays(tables).items()})


class Federation:
    def __init__(self, grid: Grid, config: RunConfig, records: RunRecords, *, expected_devices: int,
                 initial_tables: ItemTables, categories: list[str] | None = None) -> None:
        self.grid, self.config, self.records = grid, config, records
        self.num_items = initial_tables.num_items
        self.registry = DeviceRegistry(grid, hello_timeout=config.round_timeout)
        self.expected_devices = expected_devices
        self.model = ItemModelServer(config, initial_tables, categories)
        self.first_round = 1
        self.noise_multiplier = math.nan
        self.restored = False
        self.randomness = ServerRandomness.for_grid(grid, config.seed)
        # Secure aggregation: enforced by the protocol where a node is one device (deployment, device engine),
        # modelled where a node speaks for a shard of devices (cohort engine); none in the local modes.
        self.aggregation = secure_aggregation_kind(config, simulated=grid_is_simulated(grid))
        # Simulation only: a learning curve from every device's held-out items (central-eval-every).
        self.central = CentralEvaluation.for_run(config, simulated=grid_is_simulated(grid))
        # A sanity bound on reported epsilons: in simulation every device's budget is the run's policy; deployed
        # devices follow their own settings, which the server does not know.
        self.reply_budget = simulated_policy(config).epsilon_budget if grid_is_simulated(grid) else math.inf
        if config.resume and not config.state_dir and grid_is_simulated(grid):
            # Simulated devices would keep their state in Flower's Context, which a new run starts empty:
            # every device would come back with a fresh budget.
            raise ConfigError("resume=true: device state is not durable (state-dir is empty, so simulated devices "
                              "keep it in memory and would restart with empty privacy histories); set state-dir "
                              "to the folder the run's devices wrote, or start a new run")
        # From the ledger (read once): the attempts already written ahead per (kind, round), so a round run again
        # gets the next nonce; and the largest epsilon any device reported so far (the round line's running maximum).
        self.attempts: dict[tuple[str, int], int] = {}
        self.epsilon_max = 0.0
        for entry in records.read_jsonl(LEDGER):
            if entry.get("status") == "sent":
                key = (str(entry["kind"]), int(entry["round"]))
                self.attempts[key] = self.attempts.get(key, 0) + 1
            for eps in entry.get("epsilon_reported", {}).values():
                self.epsilon_max = max(self.epsilon_max, math.inf if eps is None else float(eps))
        self.warnings: list[str] = []
        self.idle_rounds: list[int] = []  # training rounds in which no device trained

    def run(self) -> FederationResult:
        cfg = self.config
        self.registry.wait_for(self.expected_devices, timeout=cfg.node_wait_timeout)
        self._restore_or_start()
        devices = len(self.registry.node_of)
        per_round = min(cfg.devices_per_round, devices)
        if cfg.devices_per_round > devices:
            self._warn(f"devices-per-round {cfg.devices_per_round} is more than the {devices} devices: each round "
                       f"asks all {devices}")
        log.info("federation: %d devices, rounds %d..%d, %d per round%s, privacy=%s sigma=%.4f server lr %.3g",
                 devices, self.first_round, cfg.rounds, per_round,
                 " (expected; Poisson sampling)" if cfg.device_sampling == "poisson" else "", cfg.privacy,
                 self.noise_multiplier, self.model.optimizer.lr)
        if not self.restored and popularity_plan(cfg) is not None:  # once per run: never again after a resume
            self._popularity_round()
        last = cfg.rounds
        stopped = ""
        if self.central is not None and not self.restored:
            self.records.append(METRICS, self.central.row(0, self.model.serving_tables()))
        for server_round in range(self.first_round, cfg.rounds + 1):
            if STOP_REQUESTED.is_set():
                raise Interrupted(f"interrupted before round {server_round}", last_round=server_round - 1)
            try:
                self._enough_devices()
            except TooFewDevices as err:
                stopped, last = str(err), server_round - 1
                log.error("stopping before round %d: %s (the last checkpoint is round %d; --resume continues)",
                          server_round, err, last)
                break
            self._train_round(server_round)
            if self.central is not None and self.central.due(server_round):
                self.records.append(METRICS, self.central.row(server_round, self.model.serving_tables()))
            if cfg.federated_eval and server_round % cfg.eval_every == 0 and server_round != cfg.rounds:
                self._evaluate(server_round, cfg.eval_devices, final=False)
        self._closing_warnings(last)
        final = {}
        if cfg.federated_eval and not stopped and self.first_round <= cfg.rounds:
            final = self._evaluate(last, cfg.final_eval_devices, final=True)
        return FederationResult(tables=self.model.serving_tables(), noise_multiplier=self.noise_multiplier,
                                final_eval=final, devices=len(self.registry.node_of), stopped=stopped,
                                warnings=self.warnings)

    def _warn(self, message: str) -> None:
        """A warning now, and again in the summary ('warnings') and the closing lines."""
        log.warning("%s", message)
        self.warnings.append(message)

    def _closing_warnings(self, last: int) -> None:
        """Say once, at the end, what the per-round lines said: rounds in which nobody trained."""
        if self.idle_rounds:
            ran = last - self.first_round + 1
            shown = ", ".join(map(str, self.idle_rounds[:10])) + (", ..." if len(self.idle_rounds) > 10 else "")
            self._warn(f"{len(self.idle_rounds)} of {ran} training rounds trained no device (rounds {shown}): the "
                       "item model did not learn in them; see the per-round lines for why (declined: budgets "
                       "spent; refused: the devices' policy)")

    def _enough_devices(self) -> None:
        """The policy for devices going offline: below `min-devices`, wait up to node-wait-timeout, then stop."""
        self.registry.refresh()
        if len(self.registry.node_of) >= self.config.min_devices:
            return
        log.warning("%d devices online, fewer than min-devices %d: waiting up to %.0fs", len(self.registry.node_of),
                    self.config.min_devices, self.config.node_wait_timeout)
        online = self.registry.wait_for(self.config.min_devices, timeout=self.config.node_wait_timeout)
        if online < self.config.min_devices:
            raise TooFewDevices(f"{online} devices online, fewer than min-devices {self.config.min_devices} after "
                                f"waiting {self.config.node_wait_timeout:.0f}s")

    def _restore_or_start(self) -> None:
        checkpoint = self.records.load_checkpoint()
        if checkpoint is not None:
            self.model.tables = checkpoint.tables
            self.model.optimizer.load_state_dict(checkpoint.optimizer_state)
            self.model.noise_variance = checkpoint.noise_variance
            if checkpoint.prior is not None:
                self.model.set_prior(checkpoint.prior, checkpoint.head)
            self.noise_multiplier = checkpoint.noise_multiplier
            self.first_round = checkpoint.server_round + 1
            self.restored = True
            self.model.follow_noise(self.noise_multiplier, len(self.registry.node_of))
            log.info("resuming after round %d from %s", checkpoint.server_round, self.records.path)
            return
        self.noise_multiplier = noise_multiplier_for(self.config, len(self.registry.node_of))
        self.model.follow_noise(self.noise_multiplier, len(self.registry.node_of))

    def _popularity_round(self) -> None:
        """Round 0: ask every device for its noisy item indicator; the sum becomes the item biases."""
        cfg, plan = self.config, popularity_plan(self.config)
        started = time.monotonic()
        asked = self.registry.group(sorted(self.registry.node_of))
        if plan.dp and plan.privacy in SECURE_MODES:
            self._secure_popularity_round(plan, asked, started)
            return
        nonce = self._write_ahead(POPULARITY_ROUND, "popularity", plan.to_config(), plan.privacy_steps(), asked)
        messages = [Message(RecordDict({P.PRIOR: ConfigRecord(plan.to_config()),
                                        P.COHORT: _cohort(devices, nonce=nonce)}),
                            dst_node_id=node, message_type=P.POPULARITY_MESSAGE, ttl=cfg.round_timeout)
                    for node, devices in asked.items()]
        replies = sort_popularity_replies(send_and_receive(self.grid, messages, timeout=cfg.round_timeout), asked,
                                          self.num_items, dp=cfg.dp, epsilon_budget=self.reply_budget)
        self._record_round(POPULARITY_ROUND, "popularity", plan.to_config(), plan.privacy_steps(), asked, replies,
                           popularity_record(plan, num_items=self.num_items), nonce=nonce)
        self.model.set_popularity(replies.ordered_parts(asked), noise_multiplier=plan.noise_multiplier)
        self._checkpoint(POPULARITY_ROUND)
        log.info("popularity prior from %d devices (%d declined, %d rejected, %d failed) in %.1fs",
                 len(replies.trained), len(replies.declined), len(replies.rejected), len(replies.failed),
                 time.monotonic() - started)

    def _secure_popularity_round(self, plan: PopularityPlan, asked: Asked, started: float) -> None:
        """Round 0 in the distributed and user modes: secure sums of the indicators, in groups of at most
        devices-per-round devices (each group one sum, decrypted only with at least t of its devices)."""
        groups = popularity_groups(asked, self.config.devices_per_round)
        total, reports, variance = np.zeros(self.num_items), 0, 0.0
        for group in groups:
            t_min, colluders = secure_threshold(self.config, group)
            mechanism = popularity_mechanism(plan, self.num_items, t_min, colluders)
            nonce = self._write_ahead(POPULARITY_ROUND, "popularity", plan.to_config(), plan.privacy_steps(), group,
                                      t_min=t_min, colluders=colluders)
            replies, decoded, shares = self._secure_sum(POPULARITY_ROUND, "popularity",
                                                        {P.PRIOR: ConfigRecord(plan.to_config())}, group, mechanism,
                                                        nonce=nonce, message_type=P.POPULARITY_MESSAGE)
            self._record_round(POPULARITY_ROUND, "popularity", plan.to_config(), plan.privacy_steps(), group, replies,
                               nonce=nonce, secure={"t_min": t_min, "colluders": colluders, "shares": shares,
                                                    "aggregation": self.aggregation,
                                                    "decrypted": decoded is not None})
            if decoded is not None:
                total += decoded
                reports += shares
                variance += mechanism.sum_noise_std(shares) ** 2
            else:
                log.warning("popularity sum of %d devices (t = %d, c = %d) not decrypted: %d shares; refusals: %s",
                            sum(len(v) for v in group.values()), t_min, colluders, shares,
                            _rule_counts(replies.refused) or "none")
        if reports:
            self.model.set_popularity_from_sum(total, reports=reports, noise_std=float(np.sqrt(variance)))
        self._checkpoint(POPULARITY_ROUND)
        log.info("popularity prior from %d secure sum(s) of %d reports (%s aggregation) in %.1fs", len(groups),
                 reports, self.aggregation, time.monotonic() - started)

    def _write_ahead(self, server_round: int, kind: str, plan: dict[str, Any], privacy_steps: list,
                     asked: Asked, tables: ItemTables | None = None, t_min: int = 0, colluders: int = 0) -> int:
        """Ledger the round before any request leaves (flushed to disk); returns the attempt's nonce.

        If the server dies after this line, the audit still charges every device asked. The nonce is
        the attempt number: a round run again after a resume tells devices to draw fresh noise.
        """
        attempt = self.attempts.get((kind, server_round), 0)
        self.attempts[(kind, server_round)] = attempt + 1
        self.records.append(LEDGER, {
            "status": "sent", "round": server_round, "kind": kind, "attempt": attempt, "time": time.time(),
            "plan": plan, "privacy_steps": [list(step) for step in privacy_steps],
            "asked": sorted(d for devices in asked.values() for d in devices),
            **({"tables_sha256": tables_digest(tables)} if tables is not None else {}),
            **({"t_min": t_min, "colluders": colluders} if t_min else {})})
        return attempt

    def _record_round(self, server_round: int, kind: str, plan: dict[str, Any], privacy_steps: list,
                      asked: Asked, replies: TrainReplies, central: dict[str, Any] | None = None, *,
                      nonce: int, secure: dict[str, Any] | None = None) -> None:
        """Append the round's outcome to the privacy ledger before anything else happens with its replies."""
        self.epsilon_max = max([self.epsilon_max, *replies.epsilon.values()])
        self.records.append(LEDGER, {
            "status": "done", "round": server_round, "kind": kind, "attempt": nonce, "time": time.time(),
            "plan": plan, "privacy_steps": [list(step) for step in privacy_steps],
            "asked": sorted(d for devices in asked.values() for d in devices), "trained": replies.trained,
            "declined": replies.declined, "refused": dict(sorted(replies.refused.items())),
            "rejected": replies.rejected, "failed": replies.failed,
            "epsilon_reported": {d: _json_epsilon(replies.epsilon[d]) for d in sorted(replies.epsilon)},
            "epsilon_subverted_reported": {d: _json_epsilon(replies.epsilon_subverted[d])
                                           for d in sorted(replies.epsilon_subverted)},
            "epsilon_honest_reported": {d: _json_epsilon(replies.epsilon_honest[d])
                                        for d in sorted(replies.epsilon_honest)},
            **({"secure_sum_seen": {d: list(replies.secure_seen[d]) for d in sorted(replies.secure_seen)}}
               if replies.secure_seen else {}),
            **({"central": central} if central else {}),
            **({"secure_sum": secure} if secure else {}),
        })

    def _checkpoint(self, server_round: int) -> None:
        self.records.save_checkpoint(Checkpoint(server_round=server_round, tables=self.model.tables,
                                                optimizer_state=self.model.optimizer.state_dict(),
                                                noise_multiplier=self.noise_multiplier,
                                                noise_variance=self.model.noise_variance,
                                                prior=self.model.prior, head=self.model.head))

    def _train_round(self, server_round: int) -> None:
        cfg = self.config
        started = time.monotonic()
        self.registry.refresh()
        population = len(self.registry.node_of)
        attempt = self.attempts.get(("train", server_round), 0)
        chosen = sample_devices(self.registry.node_of, cfg.devices_per_round,
                                rng=self.randomness.for_round(server_round, attempt, TRAIN_SALT),
                                poisson=cfg.device_sampling == "poisson")
        plan = round_plan(cfg, server_round, self.noise_multiplier, self.model.head)
        tables = _tables_record(self.model.tables)
        sent = {P.TABLES: tables, P.PLAN: ConfigRecord(plan.to_config()),
                **({P.HEAD: ArrayRecord({k: Array(v) for k, v in P.head_to_arrays(self.model.head).items()})}
                   if self.model.head is not None else {})}
        asked = self.registry.group(chosen)
        if cfg.privacy in SECURE_MODES:
            self._secure_train_round(server_round, plan, sent, asked, population, started)
            return
        trained = self.model.training_tables()
        bound = update_bound(cfg, plan, trained.num_items, trained.dim)
        nonce = self._write_ahead(server_round, "train", plan.to_config(), plan.privacy_steps(), asked,
                                  self.model.tables)
        messages = [Message(RecordDict({**sent, P.COHORT: _cohort(devices, nonce=nonce, delta_clip=bound)}),
                            dst_node_id=node, message_type="train", ttl=cfg.round_timeout)
                    for node, devices in asked.items()]
        replies = sort_train_replies(send_and_receive(self.grid, messages, timeout=cfg.round_timeout), asked,
                                     trained, dp=cfg.dp, epsilon_budget=self.reply_budget, delta_clip=bound)
        central = central_record(cfg, population=population, contributors=len(replies.trained))
        self._record_round(server_round, "train", plan.to_config(), plan.privacy_steps(), asked, replies, central,
                           nonce=nonce)
        total = PartialSum.zeros(trained.num_items, trained.dim)
        for part in replies.ordered_parts(asked):
            total.merge(part)
        applied = self.model.apply(total, plan, rng=self.randomness.for_round(server_round, nonce, CENTRAL_NOISE_SALT),
                                   population=population)
        self._checkpoint(server_round)
        self._log_round(server_round, replies, applied, started, asked)

    def _log_round(self, server_round: int, replies: TrainReplies, applied: dict[str, Any], started: float,
                   asked: Asked, colluders: int | None = None) -> None:
        cfg = self.config
        eps = list(replies.epsilon.values())
        eps_subverted = list(replies.epsilon_subverted.values())
        line = {"round": server_round, "seconds": round(time.monotonic() - started, 3),
                "trained": len(replies.trained), "declined": len(replies.declined), "refused": len(replies.refused),
                "rejected": len(replies.rejected), "failed": len(replies.failed),
                "epsilon_max_reported": _json_epsilon(max(eps)) if eps else 0.0,
                "epsilon_unbounded": bool(eps) and not math.isfinite(max(eps)),
                "epsilon_max_subverted": _json_epsilon(max(eps_subverted)) if eps_subverted else 0.0, **applied}
        self.records.append(METRICS, {"kind": "train", **line})
        # the running maximum over every device so far (it never goes down); in the secure modes the headline figure
        label = "" if colluders is None else f" (against a malicious server and c = {colluders} colluding devices)"
        log.info("round %d/%d: %d trained, %d declined, %d refused, %d rejected, %d failed, epsilon max so far %s%s "
                 "(%.1fs)", server_round, cfg.rounds, line["trained"], line["declined"], line["refused"],
                 line["rejected"], line["failed"], _epsilon_text(self.epsilon_max), label, line["seconds"])
        if not replies.trained:
            self.idle_rounds.append(server_round)
            log.warning("round %d trained no device (%d asked: %d declined, their budget spent; %d refused by their "
                        "policy; %d rejected; %d failed)", server_round, sum(len(v) for v in asked.values()),
                        line["declined"], line["refused"], line["rejected"], line["failed"])
        if replies.refused:
            log.warning("round %d: devices refused the plan by their own policy: %s", server_round,
                        _rule_counts(replies.refused))

    def _secure_train_round(self, server_round: int, plan: LocalTrainingPlan, sent: dict[str, Any], asked: Asked,
                            population: int, started: float) -> None:
        """A training round of the distributed or user mode: the server learns only the sum of the updates."""
        t_min, colluders = secure_threshold(self.config, asked)
        mechanism = training_mechanism(plan, self.num_items, self.model.tables.dim, t_min, colluders)
        nonce = self._write_ahead(server_round, "train", plan.to_config(), plan.privacy_steps(), asked,
                                  self.model.tables, t_min=t_min, colluders=colluders)
        replies, total, shares = self._secure_sum(server_round, "train", sent, asked, mechanism, nonce=nonce,
                                                  message_type="train")
        self._record_round(server_round, "train", plan.to_config(), plan.privacy_steps(), asked, replies,
                           nonce=nonce, secure={"t_min": t_min, "colluders": colluders, "shares": shares,
                                                "aggregation": self.aggregation, "decrypted": total is not None})
        if total is None:
            applied: dict[str, Any] = {"mean_delta_norm": None, "clipped": None, "shares": shares, "aborted": True}
            log.warning("round %d: the secure sum held %d shares, fewer than t = %d: nothing was decrypted or "
                        "applied", server_round, shares, t_min)
        else:
            embedding, bias = split_update(plan, total, self.num_items, self.model.tables.dim)
            applied = self.model.apply_sum(embedding, bias, shares=shares, noise_std=mechanism.sum_noise_std(shares),
                                           population=population)
        self._checkpoint(server_round)
        self._log_round(server_round, replies, applied, started, asked, colluders)

    def _secure_sum(self, server_round: int, kind: str, content: dict[str, Any], asked: Asked,
                    mechanism: SumMechanism, *, nonce: int,
                    message_type: str) -> tuple[TrainReplies, np.ndarray | None, int]:
        """Collect one secure sum: (replies, the decoded sum or None if it cannot be decrypted, shares in it).

        Cohort engine: modelled (each node sums its devices and adds their noise shares; the server adds the
        nodes' sums). Device engine and deployment: the real protocol (server/secagg.py), one device per node.
        """
        cfg = self.config
        if self.aggregation == "real":
            from .secagg import run_secure_sum

            return run_secure_sum(self.grid, cfg, server_round, kind, content, asked, mechanism, nonce=nonce,
                                  message_type=message_type, epsilon_budget=self.reply_budget)
        messages = []
        for node, devices in asked.items():
            record = ConfigRecord({P.DEVICE_IDS: devices, P.NONCE: nonce, P.THRESHOLD: mechanism.t_min,
                                   P.COLLUDERS: mechanism.colluders})
            messages.append(Message(RecordDict({**content, P.COHORT: record}), dst_node_id=node,
                                    message_type=message_type, ttl=cfg.round_timeout))
        replies = sort_grid_replies(send_and_receive(self.grid, messages, timeout=cfg.round_timeout), asked,
                                    mechanism.dimension, dp=cfg.dp, epsilon_budget=self.reply_budget)
        parts = replies.ordered_parts(asked)
        shares = sum(count for _, count in parts)
        if shares < mechanism.t_min:
            return replies, None, shares
        total = np.zeros(mechanism.dimension, dtype=np.int64)
        for grid, _ in parts:
            total += grid
        return replies, mechanism.decode(total), shares

    def _evaluate(self, server_round: int, count: int, *, final: bool) -> dict[str, Any]:
        """Ask devices for a release of their metrics (noised on the device, charged to its budget)."""
        cfg = self.config
        started = time.monotonic()
        self.registry.refresh()
        attempt = self.attempts.get(("evaluate", server_round), 0)
        chosen = sample_devices(self.registry.node_of, count, rng=self.randomness.for_round(server_round, attempt,
                                                                                           EVAL_SALT))
        plan = evaluation_plan(cfg, server_round)
        serving = self.model.serving_tables()
        tables = _tables_record(serving)
        asked = self.registry.group(chosen)
        if final:
            log.info("final federated evaluation: asking %d devices for their noised metrics ...", len(chosen))
        nonce = self._write_ahead(server_round, "evaluate", plan.to_config(), plan.privacy_steps(), asked, serving)
        messages = [Message(RecordDict({P.TABLES: tables, P.EVAL: ConfigRecord(plan.to_config()),
                                        P.COHORT: _cohort(devices, nonce=nonce)}),
                            dst_node_id=node, message_type="evaluate", ttl=cfg.round_timeout)
                    for node, devices in asked.items()]
        replies = sort_eval_replies(send_and_receive(self.grid, messages, timeout=cfg.round_timeout), asked,
                                    dp=cfg.dp, epsilon_budget=self.reply_budget)
        self._record_round(server_round, "evaluate", plan.to_config(), plan.privacy_steps(), asked, replies,
                           nonce=nonce)
        metrics = average_metrics(replies, plan)
        self.records.append(METRICS, {"kind": "final_evaluate" if final else "evaluate", "round": server_round,
                                      "seconds": round(time.monotonic() - started, 3), **metrics})
        log.info("evaluation after round %d on %d devices (noised on each device, std %.3g per metric): hr@10 %.4f "
                 "ndcg@10 %.4f recall@20 %.4f", server_round, metrics["devices"], plan.metric_std,
                 metrics.get("hr@10", math.nan), metrics.get("ndcg@10", math.nan), metrics.get("recall@20", math.nan))
        return metrics


def secure_aggregation_kind(config: RunConfig, *, simulated: bool) -> str:
    """'real', 'modelled' or 'none' (see Federation.aggregation)."""
    if config.privacy not in SECURE_MODES:
        return "none"
    return "modelled" if simulated and config.simulation_engine == "cohort" else "real"


def evaluation_plan(config: RunConfig, server_round: int) -> EvaluationPlan:
    return EvaluationPlan(server_round=server_round, dp=config.dp,
                          noise_multiplier=config.eval_noise_multiplier if config.dp else 0.0, delta=config.delta,
                          refit_l2=config.refit_l2, unit="user" if config.privacy == "user" else "record")


def average_metrics(replies: TrainReplies, plan: EvaluationPlan) -> dict[str, Any]:
    """Mean of the released (noised) metrics, with the standard error their noise alone implies."""
    released = [m for node in sorted(replies.parts) for m in replies.parts[node]]
    out: dict[str, Any] = {k: float(np.mean([m[k] for m in released])) if released else None
                           for k in RELEASED_METRICS}
    out["noise_stderr"] = plan.metric_std / math.sqrt(len(released)) if released else None
    out.update(devices=len(released), declined=len(replies.declined), refused=len(replies.refused),
               rejected=len(replies.rejected), failed=len(replies.failed))
    return out


def tables_digest(tables: ItemTables) -> str:
    """SHA-256 of the item tables sent in a round: the ledger names exactly what devices trained or evaluated on."""
    digest = hashlib.sha256(np.ascontiguousarray(tables.embedding).tobytes())
    digest.update(np.ascontiguousarray(tables.bias).tobytes())
    return digest.hexdigest()


def _json_epsilon(value: float) -> float | None:
    """Epsilon for a JSON file: infinite (a release without DP) is null, never the non-JSON Infinity."""
    return value if math.isfinite(value) else None


def _epsilon_text(value: float) -> str:
    """Epsilon to 3 significant digits ('unbounded' for a release without DP)."""
    return format(float(format(value, ".3g")), "g") if math.isfinite(value) else "unbounded"  # 1234 -> 1230


def _rule_counts(refused: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rule in refused.values():
        counts[rule] = counts.get(rule, 0) + 1
    return counts

"""Simulation only: the model evaluated centrally on every device's held-out items during the run, a learning curve
at no privacy cost (the experimenter owns the simulated devices' data; a deployed server never has it)."""

from __future__ import annotations

import logging
import time
from typing import Any

from fedrec.shared.config import RunConfig
from fedrec.shared.data.population import open_population, population_splits
from fedrec.shared.evaluation import METRIC_KEYS
from fedrec.shared.model import ItemTables

log = logging.getLogger("fedrec.server")
KIND = "central_evaluate"  # its rows' kind in metrics.jsonl


class CentralEvaluation:
    """Every `central-eval-every` rounds (and before the first and after the last): HR@10, NDCG@10, Recall@20 of the
    serving tables, each device ranking with its on-device re-fit row, as it would itself."""

    def __init__(self, config: RunConfig) -> None:
        population = open_population(config)
        self.splits = population_splits(population)
        self.num_items = population.num_items
        self.every, self.last, self.l2 = config.central_eval_every, config.rounds, config.refit_l2

    @classmethod
    def for_run(cls, config: RunConfig, *, simulated: bool) -> CentralEvaluation | None:
        if not config.central_eval_every:
            return None
        if not simulated:
            log.warning("central-eval-every=%d is a simulation feature: a deployed server holds no device data, so "
                        "there is no central evaluation", config.central_eval_every)
            return None
        return cls(config)

    def due(self, server_round: int) -> bool:
        return server_round % self.every == 0 or server_round == self.last

    def row(self, server_round: int, tables: ItemTables) -> dict[str, Any]:
        """The metrics.jsonl row of the model after `server_round` (0: before training)."""
        from fedrec.shared.ranking import evaluate_with_refit  # the re-fit solves with numpy; kept off the import path

        started = time.monotonic()
        metrics = evaluate_with_refit(tables, self.splits, self.num_items, l2=self.l2, sampled_seed=None)
        row = {"kind": KIND, "round": server_round, **{k: metrics.get(k) for k in METRIC_KEYS},
               "devices": len(self.splits), "seconds": round(time.monotonic() - started, 3)}
        log.info("central evaluation after round %d on all %d devices (no privacy cost): hr@10 %.4f ndcg@10 %.4f",
                 server_round, len(self.splits), row.get("hr@10", float("nan")), row.get("ndcg@10", float("nan")))
        return row

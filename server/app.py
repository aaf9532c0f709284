"""Flower ServerApp: read the run config, run the federation, write the summary."""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.shared.config import RunConfig
from fedrec.shared.data.population import open_population
from fedrec.shared.evaluation import METRIC_KEYS

from .core import initial_tables
from .loop import Federation
from .records import RunRecords
from .summary import privacy_summary, reference_metrics

log = logging.getLogger("fedrec.server")
GRID_PULL_INTERVAL_S = 0.005


def run_server(grid: Grid, config: RunConfig) -> dict[str, Any]:
    """Run every round of `config` on the devices behind `grid`; returns the summary it writes."""
    started = time.monotonic()
    records = RunRecords.open(config, resume=config.resume)
    population = open_population(config)
    federation = Federation(grid, config, records, expected_devices=population.num_devices,
                            initial_tables=initial_tables(config, population.catalogue()))
    result = federation.run()
    trained_s = time.monotonic() - started
    summary: dict[str, Any] = {
        "dataset": config.dataset, "data_path": config.data_path, "devices": result.devices,
        "items": population.num_items, "rounds": config.rounds, "dp": config.dp,
    }
    if config.baselines:
        summary.update(reference_metrics(config, population, result.tables))
    else:
        summary.update(metrics={k: result.final_eval.get(k, float("nan")) for k in METRIC_KEYS}, baselines={})
    summary["privacy"] = privacy_summary(config, records, result.noise_multiplier)
    summary["federated_eval"] = result.final_eval
    if result.stopped:
        summary["stopped"] = result.stopped
    summary["seconds"] = {"federation": round(trained_s, 1), "total": round(time.monotonic() - started, 1)}
    summary["run_dir"] = str(records.path)
    records.write_summary(summary)
    log.info("summary written to %s", records.path / "summary.json")
    return summary


def build_server_app(config: RunConfig | None = None) -> ServerApp:
    """A ServerApp bound to `config`, or (None) reading the run config Flower passes in the Context."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if hasattr(grid, "pull_interval"):
            # The simulation's in-memory grid polls for replies every 0.1 s by default, a fixed wait on
            # every round that is larger than a cohort round's training; replies are cheap to poll for.
            grid.pull_interval = min(grid.pull_interval, GRID_PULL_INTERVAL_S)
        run_server(grid, config or RunConfig.from_mapping(context.run_config))

    return server_app


app = build_server_app()

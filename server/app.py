"""Flower ServerApp: read the run config, run the federation, write the summary."""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from shared.config import RunConfig
from shared.data.population import open_population

from .core import initial_tables
from .loop import Federation
from .records import RunRecords
from .summary import privacy_summary, reference_metrics

log = logging.getLogger("fedrec.server")


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
    summary.update(reference_metrics(config, population, result.tables))
    summary["privacy"] = privacy_summary(config, records, result.noise_multiplier)
    summary["federated_eval"] = result.final_eval
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
        run_server(grid, config or RunConfig.from_mapping(context.run_config))

    return server_app


app = build_server_app()

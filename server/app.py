"""Flower ServerApp: read the run config, run the federation, write the summary."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrec.shared.config import RunConfig
from fedrec.shared.data.catalogue import Catalogue
from fedrec.shared.data.population import Population, open_catalogue, open_population, simulated_device_count
from fedrec.shared.data.prepared import refuse_inside_flower_app
from fedrec.shared.evaluation import METRIC_KEYS

from .core import initial_tables
from .loop import Federation
from .records import RunRecords, default_run_dir
from .registry import grid_is_simulated
from .summary import privacy_summary, reference_metrics

log = logging.getLogger("fedrec.server")
GRID_PULL_INTERVAL_S = 0.005


@dataclass(frozen=True)
class ServerInputs:
    """What the server reads before its first round."""

    catalogue: Catalogue  # public: item count and categories for the initial item tables
    expected_devices: int  # devices to wait for before round 0; more may join later
    population: Population | None = None  # every device's data: only a simulation with baselines has it


def server_inputs(grid: Grid, config: RunConfig) -> ServerInputs:
    """The catalogue and device count; the population (all devices' events) only for a simulation's baselines."""
    if not grid_is_simulated(grid):
        # Deployment: the server holds no personal data - the public catalogue and the plan settings; it
        # waits for min-devices devices to say hello and continues with whoever has (more may join later).
        if config.baselines:
            log.warning("baselines=true is a simulation feature: a deployed server holds no device data, so it "
                        "reports the devices' federated evaluation only (set baselines=false to silence this)")
        return ServerInputs(open_catalogue(config, deployed=True), expected_devices=config.min_devices)
    if config.baselines:
        population = open_population(config)
        return ServerInputs(population.catalogue(), population.num_devices, population)
    return ServerInputs(open_catalogue(config, deployed=False), simulated_device_count(config))


def check_output_folders(config: RunConfig) -> None:
    """Refuse run records or device state inside a Flower app folder (`flwr run` would pack them)."""
    refuse_inside_flower_app(Path(config.out_dir) if config.out_dir else default_run_dir(), "out-dir")
    if config.state_dir:
        refuse_inside_flower_app(Path(config.state_dir), "state-dir")


def run_server(grid: Grid, config: RunConfig) -> dict[str, Any]:
    """Run every round of `config` on the devices behind `grid`; returns the summary it writes."""
    started = time.monotonic()
    check_output_folders(config)
    inputs = server_inputs(grid, config)
    records = RunRecords.open(config, resume=config.resume)
    federation = Federation(grid, config, records, expected_devices=inputs.expected_devices,
                            initial_tables=initial_tables(config, inputs.catalogue),
                            categories=list(inputs.catalogue.categories) if inputs.catalogue.categories else None)
    result = federation.run()
    trained_s = time.monotonic() - started
    summary: dict[str, Any] = {
        "dataset": config.dataset, "data_path": config.data_path, "devices": result.devices,
        "items": inputs.catalogue.num_items, "rounds": config.rounds, "dp": config.dp,
    }
    if inputs.population is not None:
        summary.update(reference_metrics(config, inputs.population, result.tables))
    else:
        summary.update(metrics={k: result.final_eval.get(k) for k in METRIC_KEYS}, baselines={})  # null: unknown
    summary["privacy"] = privacy_summary(config, records, result.noise_multiplier, randomness=federation.randomness)
    summary["federated_eval"] = result.final_eval
    if result.stopped:
        summary["stopped"] = result.stopped
    # devices actually asked per round (devices-per-round is capped by the devices there are)
    summary["devices_per_round"] = min(config.devices_per_round, result.devices)
    summary["warnings"] = result.warnings
    summary["seconds"] = {"federation": round(trained_s, 1), "total": round(time.monotonic() - started, 1)}
    summary["run_dir"] = str(records.path)
    records.write_summary(summary)
    log.info("summary written to %s", records.path / "summary.json")
    return summary


def _log_through_flower() -> None:
    """A deployed ServerApp's own process has no logging set up: send fedrec's progress lines (one per round,
    with its time) through Flower's handlers, which `flwr run --stream` shows and the SuperLink keeps."""
    ours = logging.getLogger("fedrec")
    if ours.handlers or logging.getLogger().handlers:
        return  # a simulation (or a caller) already shows them
    for handler in logging.getLogger("flwr").handlers:
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)


def build_server_app(config: RunConfig | None = None) -> ServerApp:
    """A ServerApp bound to `config`, or (None) reading the run config Flower passes in the Context."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if hasattr(grid, "pull_interval"):
            # The simulation's in-memory grid polls for replies every 0.1 s by default, a fixed wait on
            # every round that is larger than a cohort round's training; replies are cheap to poll for.
            grid.pull_interval = min(grid.pull_interval, GRID_PULL_INTERVAL_S)
        _log_through_flower()
        run_server(grid, config or RunConfig.from_mapping(context.run_config))

    return server_app


app = build_server_app()

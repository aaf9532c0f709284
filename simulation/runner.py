"""`fedrec simulate`: prepare the data, run the Flower app in the simulation engine, report."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.data.loaders import load_dataset
from shared.data.population import open_population
from shared.data.prepare import PrepareSettings, prepare_log
from shared.evaluation import METRIC_KEYS

log = logging.getLogger("fedrec.simulation")

# The simulation engine reaches no network: no telemetry, no Ray usage statistics or dashboard.
QUIET_ENVIRONMENT = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
                     "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def quiet_environment() -> None:
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def prepare_run_data(config: RunConfig, run_dir: Path) -> RunConfig:
    """Raw data sets are prepared once into the run directory; the Flower app reads the prepared folder."""
    if config.dataset in ("synthetic", "prepared"):
        return config
    prepared = run_dir / "prepared"
    if not (prepared / "manifest.json").exists():
        settings = PrepareSettings(min_user_items=config.min_user_items, min_item_users=config.min_item_users,
                                   device_files=False)
        prepare_log(load_dataset(config), prepared, dataset=config.dataset, settings=settings)
    return config.replace(dataset="prepared", data_path=str(prepared.resolve()))


def simulate(config: RunConfig, *, verbose: bool = False, client_mods: list | None = None) -> dict[str, Any]:
    """Run a whole simulation; returns the summary (also written to <run dir>/summary.json).

    `client_mods` are Flower mods wrapped around every device (e.g. to inject faults in tests).
    """
    quiet_environment()
    from flwr.simulation import run_simulation  # after the environment is set

    from client.app import build_client_app
    from server.app import build_server_app

    run_dir = Path(config.out_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = prepare_run_data(config, run_dir)
    if not config.state_dir:
        config = config.replace(state_dir=str(run_dir / "device-state"))
    config = config.replace(out_dir=str(run_dir))
    devices = open_population(config).num_devices
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    cpus = os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                             "logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose}}
    log.info("simulating %d devices on %d CPUs; run directory %s", devices, cpus, run_dir)
    run_simulation(server_app=build_server_app(config), client_app=build_client_app(config, mods=client_mods),
                   num_supernodes=devices, backend_config=backend, verbose_logging=verbose)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())


def format_table(summary: dict[str, Any]) -> str:
    """The final table: the federated model against the baselines, and the privacy spent."""
    label = "federated + DP" if summary["dp"] else "federated (no DP)"
    rows = [(label, summary["metrics"])] + [(name.replace("_", " "), block)
                                            for name, block in summary["baselines"].items()]
    header = f"{'model':<20}" + "".join(f"{k:>13}" for k in METRIC_KEYS)
    lines = [f"{summary['dataset']}: {summary['devices']} devices, {summary['items']} items, "
             f"{summary['rounds']} rounds", header, "-" * len(header)]
    lines += [f"{name:<20}" + "".join(f"{block[k]:>13.4f}" for k in METRIC_KEYS) for name, block in rows]
    priv = summary["privacy"]["record_level"]
    if summary["dp"]:
        lines.append(f"record-level DP per device: epsilon max {priv['epsilon_max']:.3f}, median "
                     f"{priv['epsilon_median']:.3f} (budget {priv['budget']}, delta {priv['delta']:g}); "
                     f"sigma {priv['noise_multiplier']:.3f}; {priv['devices_declined']} devices declined a round")
    else:
        lines.append("no differential privacy: updates are not private")
    lines.append(f"run directory: {summary['run_dir']}  ({summary['seconds']['total']:.0f}s)")
    return "\n".join(lines)

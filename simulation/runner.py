"""`fedrec simulate`: prepare the data, run the Flower app in the simulation engine, report."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedrec.server.records import default_run_dir
from fedrec.shared.config import RunConfig
from fedrec.shared.data.interactions import DataError
from fedrec.shared.data.loaders import load_dataset
from fedrec.shared.data.population import open_population
from fedrec.shared.data.prepare import PrepareSettings, prepare_log
from fedrec.shared.data.prepared import prepared_device_count, refuse_inside_flower_app
from fedrec.shared.evaluation import METRIC_KEYS

from .plain import node_count

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


# Flower 1.42's simulation engine hands requests to the node workers from a thread that sweeps every
# node's inbox and then sleeps 0.1 s: a fixed wait at the start of every round, larger than a cohort
# round's training at 100 devices. With few nodes (the cohort engine) sweeping more often is cheap.
DISPATCH_SWEEP_S = 0.005
DISPATCH_MAX_NODES = 256  # a sweep asks every node; above this keep Flower's own interval


@contextlib.contextmanager
def prompt_dispatch(nodes: int) -> Iterator[None]:
    """Within the block, the engine's dispatch thread sweeps every 5 ms (few nodes only; Flower 1.42's layout)."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        yield
        return
    original = getattr(vce_api, "add_messages_to_queue", None)
    expected = ["state", "queue", "nodes_mapping", "f_stop"]
    if nodes > DISPATCH_MAX_NODES or original is None or list(inspect.signature(original).parameters) != expected:
        yield
        return

    def sweep_often(state: Any, queue: Any, nodes_mapping: dict, f_stop: threading.Event) -> None:
        while not f_stop.is_set():
            for node_id in list(nodes_mapping):
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            f_stop.wait(DISPATCH_SWEEP_S)

    vce_api.add_messages_to_queue = sweep_often
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


def backend_config(config: RunConfig, cpus: int, *, verbose: bool) -> dict[str, Any]:
    """Flower's Ray backend: a private Ray instance on this machine, or the cluster at `ray-address`."""
    init_args: dict[str, Any] = {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose}
    if config.ray_address:
        init_args["address"] = config.ray_address  # the cluster's own resources apply
    else:
        init_args.update(num_cpus=cpus, num_gpus=0, include_dashboard=False)
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


def simulate(config: RunConfig, *, verbose: bool = False, client_mods: list | None = None) -> dict[str, Any]:
    """Run a whole simulation; returns the summary (also written to <run dir>/summary.json).

    `client_mods` are Flower mods wrapped around every device (e.g. to inject faults in tests). An empty
    out-dir is runs/<timestamp>.
    """
    quiet_environment()
    from flwr.simulation import run_simulation  # after the environment is set

    from fedrec.client.app import build_client_app
    from fedrec.server.app import build_server_app
    from fedrec.server.core import noise_multiplier_for

    run_dir = Path(config.out_dir or default_run_dir()).resolve()
    refuse_inside_flower_app(run_dir, "out-dir")  # before anything is written there
    if config.state_dir:
        refuse_inside_flower_app(Path(config.state_dir), "state-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = prepare_run_data(config, run_dir)
    if not config.state_dir:
        config = config.replace(state_dir=str(run_dir / "device-state"))
    config = config.replace(out_dir=str(run_dir))
    devices = open_population(config).num_devices
    noise_multiplier_for(config, devices)  # a budget no sigma fits is refused here, before Ray starts
    available = data_set_devices(config)
    if available is not None:
        log.info("%d of the data set's %d devices take part (devices=%d; 0 = all)", devices, available, config.devices)
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    cpus = os.cpu_count() or 1
    nodes = node_count(config, devices, cpus=cpus)
    log.info("simulating %d devices on %d nodes (%s engine); run directory %s", devices, nodes,
             config.simulation_engine, run_dir)
    with prompt_dispatch(nodes):
        run_simulation(server_app=build_server_app(config), client_app=build_client_app(config, mods=client_mods),
                       num_supernodes=nodes, backend_config=backend_config(config, cpus, verbose=verbose),
                       verbose_logging=verbose)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())


def data_set_devices(config: RunConfig) -> int | None:
    """Devices in the run's real data set (its prepared folder's manifest); None for synthetic data or unreadable."""
    if config.dataset != "prepared":
        return None
    try:
        return prepared_device_count(Path(config.data_path))
    except (DataError, OSError):
        return None


def privacy_lines(summary: dict[str, Any]) -> list[str]:
    """Which guarantees hold, one line each, and 'none' only where none does."""
    privacy, lines = summary["privacy"], []
    priv = privacy["record_level"]
    mode = privacy.get("mode", "local")
    secure = mode in ("distributed", "user")
    figures = privacy["user_level"] if mode == "user" else priv
    unit = "user-level" if mode == "user" else "record-level"
    if secure:
        lines.append(f"privacy mode {mode}, secure aggregation {privacy['secure_aggregation']}: "
                     f"{privacy['trust_model']}")
    if summary["dp"] and figures.get("epsilon_max") is not None:
        line = (f"{unit} DP per device: epsilon max {figures['epsilon_max']:.3f}, median "
                f"{figures['epsilon_median']:.3f} (budget {figures['budget']}, delta {priv['delta']:g}); "
                f"sigma {figures['noise_multiplier']:.3f}; {priv['devices_declined']} devices declined a round")
        if secure:
            def fmt(key: str) -> str:
                value = figures.get(key)
                return "unbounded" if value is None else format(value, ".3f")

            line += (f" (against a malicious server with c colluders; honest-but-curious server: epsilon max "
                     f"{fmt('epsilon_max_honest')}; server that also controls enrolment, own share only: "
                     f"{fmt('epsilon_max_subverted')})")
        lines.append(line)
    elif summary["dp"]:
        lines.append(f"{unit} DP per device: not bounded ({priv.get('note', 'a device released without DP')})")
    user = privacy.get("user_level") if not secure else None
    if user is not None:
        eps = user["epsilon"]
        lines.append(f"user-level DP (trusted server adds the noise): epsilon "
                     f"{'unbounded' if eps is None else format(eps, '.3f')} (delta {user['delta']:g}; without "
                     f"amplification {user['epsilon_without_amplification']})")
    if not summary["dp"] and user is None:
        lines.append("no differential privacy: updates are not private")
    if "server_randomness" in privacy:
        lines.append(f"server randomness: {privacy['server_randomness']}")
    return lines


def _cell(value: float | None) -> str:
    """A metric cell: '-' where the value is unknown (null in summary.json)."""
    return f"{'-':>13}" if value is None or value != value else f"{value:>13.4f}"


def format_table(summary: dict[str, Any], *, available: int | None = None) -> str:
    """The final table: the federated model against the baselines, and the privacy spent.

    `available`: the devices of the real data set (see data_set_devices); the header then says "N of M devices".
    """
    label = "federated + DP" if summary["dp"] else "federated (no DP)"
    rows = [(label, summary["metrics"])] + [(name.replace("_", " "), block)
                                            for name, block in summary["baselines"].items()]
    header = f"{'model':<20}" + "".join(f"{k:>13}" for k in METRIC_KEYS)
    devices = f"{summary['devices']} devices" if available is None else f"{summary['devices']} of {available} devices"
    lines = [f"{summary['dataset']}: {devices}, {summary['items']} items, "
             f"{summary['rounds']} rounds", header, "-" * len(header)]
    lines += [f"{name:<20}" + "".join(_cell(block.get(k)) for k in METRIC_KEYS) for name, block in rows]
    lines += privacy_lines(summary)
    lines.append(f"run directory: {summary['run_dir']}  ({summary['seconds']['total']:.0f}s)")
    return "\n".join(lines)

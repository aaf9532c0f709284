"""`fedrec simulate`: prepare the data, run the Flower app in the simulation engine, report."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedrec.server.records import CONFIG, RESUMABLE_CHANGES, SUMMARY, default_run_dir
from fedrec.shared.config import ConfigError, RunConfig
from fedrec.shared.data.interactions import DataError
from fedrec.shared.data.loaders import load_dataset
from fedrec.shared.data.population import open_population
from fedrec.shared.data.prepare import PrepareSettings, prepare_log
from fedrec.shared.data.prepared import prepared_device_count, refuse_inside_flower_app
from fedrec.shared.evaluation import METRIC_KEYS
from fedrec.shared.state import atomic_write

from . import procs
from .plain import node_count

log = logging.getLogger("fedrec.simulation")

# The simulation engine reaches no network: no telemetry, no Ray usage statistics or dashboard.
QUIET_ENVIRONMENT = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
                     "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def quiet_environment() -> None:
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


RUN_LOG = "fedrec.log"  # the run's own log, in its run directory


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; its records are consistent up to `last_round` and --resume continues it."""

    def __init__(self, run_dir: Path, last_round: int) -> None:
        self.run_dir, self.last_round = run_dir, last_round
        super().__init__(f"interrupted: the run stopped after round {last_round} (its checkpoint and privacy ledger "
                         f"are consistent); to continue it: fedrec simulate --out {run_dir} --resume")


class DropDeprecationNotice(logging.Filter):
    """Flower marks its Python simulation API deprecated; fedrec uses it on purpose (no SuperLink to start)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


class PlainFormatter(logging.Formatter):
    """The run log's lines: dated, without the colour codes Flower and Ray put in some messages."""

    ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

    def format(self, record: logging.LogRecord) -> str:
        return self.ANSI.sub("", super().format(record))


@contextlib.contextmanager
def run_log(run_dir: Path, *, verbose: bool) -> Iterator[None]:
    """Within the block, fedrec's lines (and Flower's warnings) are also appended to RUN_DIR/fedrec.log."""
    handler = logging.FileHandler(run_dir / RUN_LOG, encoding="utf-8")
    handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    flower = logging.FileHandler(run_dir / RUN_LOG, encoding="utf-8")
    flower.setFormatter(handler.formatter)
    flower.setLevel(logging.DEBUG if verbose else logging.WARNING)
    flower.addFilter(DropDeprecationNotice())
    ours, theirs = logging.getLogger("fedrec"), logging.getLogger("flwr")
    level = ours.level
    if level == logging.NOTSET or level > logging.INFO:  # the API path: no level set by the CLI
        ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.addHandler(handler)
    theirs.addHandler(flower)
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.setLevel(level)
        theirs.removeHandler(flower)
        handler.close()
        flower.close()


def quiet_flower() -> None:
    """The CLI and the Python API alike: no deprecation notice for the simulation API we use on purpose."""
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, DropDeprecationNotice) for f in flower.filters):
        flower.addFilter(DropDeprecationNotice())


@contextlib.contextmanager
def stop_on_interrupt(run_dir: Path) -> Iterator[None]:
    """Ctrl-C while the simulation runs: the first asks the round loop to stop before its next round (Flower then
    shuts Ray down); a second stops at once, every child process with it.

    Ray's own daemons and workers block SIGINT, so a terminal's Ctrl-C to the process group reaches only this
    process; without this handler a KeyboardInterrupt in the main thread shut Ray down under the still running
    round loop (a page of ActorDiedError, then a loop waiting for replies that never came).
    """
    from fedrec.server.loop import STOP_REQUESTED

    STOP_REQUESTED.clear()  # an earlier run's Ctrl-C (a notebook's kernel lives on) does not stop this one
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can be set only in the main thread: a caller's thread keeps its own handling
        return

    def interrupt(signum: int, frame: Any) -> None:
        if not STOP_REQUESTED.is_set():
            STOP_REQUESTED.set()
            log.warning("interrupted: stopping before the next round and shutting Ray down (Ctrl-C again to stop "
                        "at once)")
            return
        log.warning("interrupted again: stopping at once; the privacy ledger is written before each round, so "
                    "a resume charges the round that was under way and runs it again: fedrec simulate --out %s "
                    "--resume", run_dir)
        hard_stop(130)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def hard_stop(code: int) -> None:
    """Kill every process this one started (Ray's daemons and workers), then exit without unwinding threads."""
    for pid in procs.with_descendants([os.getpid()]) - {os.getpid()}:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for handler in logging.getLogger("fedrec").handlers:
        handler.flush()
    os._exit(code)


def check_run_dir(run_dir: Path, config: RunConfig, *, settings: bool = True) -> None:
    """What RunRecords.open would refuse once Ray runs, refused before it starts: a run directory that already holds
    a run (unless resuming it), a resume of nothing, and (`settings`: `config` as the server will get it) a resume
    with other settings than the run's (RESUMABLE_CHANGES aside)."""
    stored = run_dir / CONFIG
    if not config.resume:
        if stored.exists():
            raise ConfigError(f"{run_dir} already holds a run: continue it (fedrec simulate --out {run_dir} "
                              "--resume) or choose another --out")
        return
    if not stored.exists():
        raise ConfigError(f"{run_dir}: no run to resume (no {CONFIG}); start it without --resume")
    if not settings:
        return
    previous = RunConfig.load_json(stored).to_mapping()
    changed = sorted({k for k, v in config.to_mapping().items() if previous.get(k) != v} - RESUMABLE_CHANGES)
    if changed:
        detail = ", ".join(f"{k}: {previous.get(k)!r} in the run, {config.to_mapping()[k]!r} now" for k in changed)
        raise ConfigError(f"{stored}: cannot resume with different settings ({detail}); only "
                          f"{sorted(RESUMABLE_CHANGES - {'resume', 'out-dir'})} may change")


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
    quiet_flower()
    from flwr.simulation import run_simulation  # after the environment is set

    from fedrec.client.app import build_client_app
    from fedrec.server.app import build_server_app
    from fedrec.server.core import noise_multiplier_for
    from fedrec.server.loop import Interrupted

    run_dir = Path(config.out_dir or default_run_dir()).resolve()
    refuse_inside_flower_app(run_dir, "out-dir")  # before anything is written there
    if config.state_dir:
        refuse_inside_flower_app(Path(config.state_dir), "state-dir")
    check_run_dir(run_dir, config, settings=False)  # before anything is read or written
    created = not run_dir.exists()
    try:  # every check that can fail runs before Ray starts; a failed start leaves no folder it made behind
        run_dir.mkdir(parents=True, exist_ok=True)
        config = prepare_run_data(config, run_dir)
        if not config.state_dir:
            config = config.replace(state_dir=str(run_dir / "device-state"))
        config = config.replace(out_dir=str(run_dir))
        check_run_dir(run_dir, config)  # a resume's settings as the server will see them
        devices = open_population(config).num_devices
        noise_multiplier_for(config, devices)  # a budget no sigma fits is refused here, before Ray starts
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    with run_log(run_dir, verbose=verbose):
        available = data_set_devices(config)
        if available is not None:
            log.info("%d of the data set's %d devices take part (devices=%d; 0 = all)", devices, available,
                     config.devices)
        logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
        cpus = os.cpu_count() or 1
        nodes = node_count(config, devices, cpus=cpus)
        log.info("simulating %d devices on %d nodes (%s engine); run directory %s; log %s", devices, nodes,
                 config.simulation_engine, run_dir, run_dir / RUN_LOG)
        try:
            with prompt_dispatch(nodes), stop_on_interrupt(run_dir):
                run_simulation(server_app=build_server_app(config),
                               client_app=build_client_app(config, mods=client_mods), num_supernodes=nodes,
                               backend_config=backend_config(config, cpus, verbose=verbose), verbose_logging=verbose)
        except Interrupted as err:
            log.warning("%s", err)
            raise RunInterrupted(run_dir, err.last_round) from None
        summary_path = run_dir / SUMMARY
        if not summary_path.exists():
            raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
        summary = json.loads(summary_path.read_text())
        source = data_source(config, run_dir)
        if source is not None:
            summary = {**summary, **source}
            atomic_write(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
        from .learning_curve import write_learning_curve

        write_learning_curve(run_dir)  # HR@10 per round beside the epsilon spent, where the run evaluated
        return summary


def data_source(config: RunConfig, run_dir: Path) -> dict[str, Any] | None:
    """For a prepared folder, where its data came from (its manifest): `source` {dataset, path, format}; where the
    folder is the run's own (raw data prepared by simulate), the summary's dataset and data_path name the raw data."""
    if config.dataset != "prepared":
        return None
    try:
        manifest = json.loads((Path(config.data_path) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    raw = manifest.get("preprocessing", {})
    source = {"dataset": manifest.get("dataset"), "path": manifest.get("source"),
              "format": raw.get("file_format", raw.get("format"))}
    out: dict[str, Any] = {"source": source}
    if Path(config.data_path).resolve() == (run_dir / "prepared").resolve():
        out.update(dataset=source["dataset"], data_path=source["path"], prepared_path=config.data_path)
    return out


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


def format_table(summary: dict[str, Any], *, available: int | None = None,
                 central: dict[str, Any] | None = None) -> str:
    """The final table: the federated model against the baselines, and the privacy spent.

    `available`: the devices of the real data set (see data_set_devices); the header then says "N of M devices".
    `central`: the run's last central evaluation (central-eval-every), shown as its own row when baselines are off.
    """
    label = "federated + DP" if summary["dp"] else "federated (no DP)"
    # Without baselines the model's row is the devices' federated evaluation: noised on each device (marked *).
    noise = (summary.get("federated_eval") or {}).get("noise_stderr") if not summary["baselines"] else None
    label += " *" if noise is not None else ""
    rows = [(label, summary["metrics"])] + [(name.replace("_", " "), block)
                                            for name, block in summary["baselines"].items()]
    if central is not None and not summary["baselines"]:
        rows.insert(1, ("federated, central", central))
    header = f"{'model':<20}" + "".join(f"{k:>13}" for k in METRIC_KEYS)
    devices = f"{summary['devices']} devices" if available is None else f"{summary['devices']} of {available} devices"
    lines = [f"{summary['dataset']}: {devices}, {summary['items']} items, "
             f"{summary['rounds']} rounds", header, "-" * len(header)]
    lines += [f"{name:<20}" + "".join(_cell(block.get(k)) for k in METRIC_KEYS) for name, block in rows]
    if noise is not None:
        lines.append(f"* noisy: the devices' federated evaluation, each metric noised on the device (noise std of "
                     f"each mean {noise:.3g}); baselines=true evaluates it centrally, without noise")
    if central is not None and not summary["baselines"]:
        lines.append(f"federated, central: the model after round {central['round']} ranked on every device's held-out "
                     "items, without noise (central-eval-every: a simulation only)")
    lines += privacy_lines(summary)
    lines += [f"warning: {warning}" for warning in summary.get("warnings", [])]
    lines.append(f"run directory: {summary['run_dir']}  ({summary['seconds']['total']:.0f}s)")
    return "\n".join(lines)

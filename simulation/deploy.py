"""`fedrec deploy-local`: a real deployment on loopback - a SuperLink with TLS and SuperNode authentication,
one SuperNode per device with only its own data, `flwr run` of the app - and every process stopped after."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedrec.shared.config import ConfigError, RunConfig
from fedrec.shared.data.population import open_population
from fedrec.shared.data.prepare import prepare_population

from .credentials import TlsFiles, write_node_keys, write_tls
from .procs import free_port

log = logging.getLogger("fedrec.deploy")
CONNECTION = "fedrec-local"
START_TIMEOUT_S = 60.0


def _toml_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


class LocalDeployment:
    """The processes of one loopback federation under `out`; use as a context manager (stops everything)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out).resolve()
        self.logs = self.out / "logs"
        self.home = self.out / "flwr-home"
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self.tls: TlsFiles | None = None
        bin_dir = Path(sys.executable).parent
        self.tool = {name: str(bin_dir / name) for name in ("flower-superlink", "flower-supernode", "flwr")}
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_TELEMETRY_ENABLED": "0"}

    def __enter__(self) -> LocalDeployment:
        for folder in (self.logs, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        self.tls = write_tls(self.out / "credentials" / "tls")
        # Only this connection exists in this Flower home: nothing can select a remote SuperLink.
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.tls.ca_cert}"\n', encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    # -- processes -------------------------------------------------------------------
    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_file = open(self.logs / f"{name}.log", "ab")
        # Own session: the process and whatever it spawns (ServerApp/ClientApp runs) stop together.
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=self.env, cwd=self.out,
                                   start_new_session=True)
        log_file.close()
        self.processes[name] = process
        log.info("started %s (pid %d), log %s", name, process.pid, self.logs / f"{name}.log")
        return process

    def stop(self, name: str, *, sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        for signum in (sig, signal.SIGKILL):
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        _reap_group(process.pid)
        log.info("stopped %s (pid %d)", name, process.pid)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def start_superlink(self) -> None:
        assert self.tls is not None
        self._start("superlink", [self.tool["flower-superlink"], "--ssl-ca-certfile", str(self.tls.ca_cert),
                                  "--ssl-certfile", str(self.tls.server_cert), "--ssl-keyfile", str(self.tls.server_key),
                                  "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(self.port),
                                  "--database", str(self.out / "superlink.db"),
                                  "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.processes["superlink"].poll() is not None:
                raise RuntimeError(f"the SuperLink exited; see {self.logs / 'superlink.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the SuperLink did not listen on port {self.port} within {START_TIMEOUT_S:.0f}s")

    def node_keys(self, name: str) -> tuple[Path, Path]:
        return write_node_keys(self.out / "credentials" / "supernodes", name)

    def register(self, public_key: Path) -> None:
        done = subprocess.run([self.tool["flwr"], "supernode", "register", str(public_key), CONNECTION],
                              env=self.env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or "registered" not in done.stdout:
            raise RuntimeError(f"registering {public_key.name} failed: {done.stdout[-500:]}{done.stderr[-500:]}")

    def start_supernode(self, name: str, private_key: Path, node_config: dict[str, Any]) -> subprocess.Popen:
        assert self.tls is not None
        config = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
        return self._start(name, [self.tool["flower-supernode"], "--root-certificates", str(self.tls.ca_cert),
                                  "--superlink", f"127.0.0.1:{self.port}", "--auth-supernode-private-key",
                                  str(private_key), "--port", str(free_port()), "--node-config", config])

    def restart_supernode(self, name: str, private_key: Path, node_config: dict[str, Any], *,
                          patience: float = 180.0) -> subprocess.Popen:
        """Start a SuperNode again under the same key, retrying while the SuperLink still holds its old session.

        A SuperNode that died without shutting down stays 'online' at the SuperLink until its heartbeat
        expires (about a minute in Flower 1.42); until then the SuperLink refuses to activate it again.
        """
        deadline = time.monotonic() + patience
        while True:
            process = self.start_supernode(name, private_key, node_config)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                return process  # connected and running
            self.processes.pop(name, None)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} could not rejoin within {patience:.0f}s; see {self.logs / name}.log")
            log.info("%s refused (its old session is still open at the SuperLink); retrying", name)
            time.sleep(5)

    def run(self, run_config: dict[str, Any], *, timeout: float) -> subprocess.CompletedProcess:
        """`flwr run` of the installed fedrec app against the SuperLink; returns when the run has finished."""
        app = write_flower_app(self.out / "app")
        pairs = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        with open(self.logs / "flwr-run.log", "ab") as log_file:
            return subprocess.run([self.tool["flwr"], "run", str(app), CONNECTION, "--stream", "--run-config", pairs],
                                  env=self.env, cwd=self.out, stdout=log_file, stderr=subprocess.STDOUT,
                                  timeout=timeout, start_new_session=True)


def write_flower_app(folder: Path) -> Path:
    """The Flower app that deploy-local runs: a folder holding only its pyproject.toml.

    Its component paths name the installed package (fedrec.server.app, fedrec.client.app), so the
    SuperLink and every SuperNode run the fedrec installed beside them, editable or not, and the
    app bundle `flwr run` ships carries no code and no file of the run. The defaults of
    [tool.flwr.app.config] come from RunConfig, the single source of truth.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["[project]", 'name = "fedrec"', f'version = "{_version()}"', "dependencies = []", "",
             "[tool.flwr.app]", 'publisher = "fedrec"', "", "[tool.flwr.app.components]",
             'serverapp = "fedrec.server.app:app"', 'clientapp = "fedrec.client.app:app"', "",
             "[tool.flwr.app.config]", *(f"{k} = {_toml_value(v)}" for k, v in RunConfig().to_mapping().items())]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _version() -> str:
    try:
        return importlib.metadata.version("fedrec")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _reap_group(pgid: int) -> None:
    """Children that left the group's leader behind (e.g. ClientApp processes) are stopped too."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def prepare_devices(config: RunConfig, folder: Path) -> Path:
    """Per-device files and the catalogue: `fedrec prepare` output as given, or the synthetic population."""
    if config.dataset == "prepared":
        if not (Path(config.data_path) / "devices").is_dir():
            raise ConfigError(f"{config.data_path}: no devices/ folder; run fedrec prepare without --no-device-files")
        return Path(config.data_path).resolve()
    if config.dataset != "synthetic":
        raise ConfigError(f"dataset '{config.dataset}': deploy-local takes synthetic data or a fedrec prepare folder "
                          "(dataset=prepared); prepare raw logs first")
    if not (folder / "manifest.json").exists():
        prepare_population(open_population(config), folder, dataset="synthetic")
    return folder.resolve()


def device_files(config: RunConfig, out: Path) -> tuple[Path, list[Path]]:
    """The prepared folder and the devices' own files (the first `devices` of them, 0 = all)."""
    data = prepare_devices(config, out / "data")
    files = sorted((data / "devices").glob("*.csv"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
    return data, files[:config.devices] if config.devices else files


def server_run_config(config: RunConfig, data: Path, devices: int, run_dir: Path) -> dict[str, Any]:
    """The settings `flwr run` passes: those that differ from the defaults, and the deployment's own."""
    defaults = RunConfig().to_mapping()
    run_config = {k: v for k, v in config.to_mapping().items() if v != defaults[k] and k not in ("state-dir", "resume")}
    run_config.update({"dataset": "prepared", "data-path": str(data), "devices": devices, "out-dir": str(run_dir),
                       "baselines": False})
    return run_config


def start_devices(deployment: LocalDeployment, data: Path, files: list[Path]) -> dict[str, tuple[Path, dict]]:
    """Register a key per device and start its SuperNode; returns name -> (private key, node config)."""
    nodes = {}
    for path in files:
        private, public = deployment.node_keys(f"device-{path.stem}")
        deployment.register(public)
        state = deployment.out / "devices" / path.stem
        state.mkdir(parents=True, exist_ok=True)
        node_config = {"data-path": str(path), "catalogue-path": str(data / "catalogue.csv"), "state-path": str(state)}
        deployment.start_supernode(f"supernode-{path.stem}", private, node_config)
        nodes[f"supernode-{path.stem}"] = (private, node_config)
    return nodes


def deploy_local(config: RunConfig, out: Path, *, timeout: float = 1800.0) -> dict[str, Any]:
    """Run `config` as a real federation on loopback: one SuperNode per device. Returns the run's summary."""
    out = Path(out).resolve()
    data, files = device_files(config, out)
    run_dir = out / "run"
    with LocalDeployment(out) as deployment:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            deployment.start_superlink()
            start_devices(deployment, data, files)
            log.info("%d SuperNodes started; running the app (progress in %s)", len(files),
                     deployment.logs / "flwr-run.log")
            deployment.run(server_run_config(config, data, len(files), run_dir), timeout=timeout)
        finally:
            signal.signal(signal.SIGTERM, previous)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the run ended without {summary_path}; see {out / 'logs'}")
    return json.loads(summary_path.read_text())


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

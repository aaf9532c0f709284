"""`fedrec deploy-local`: a real deployment on loopback - a SuperLink with TLS and SuperNode authentication,
one SuperNode per device with only its own data and an enrolled identity, `flwr run` of the app - and every
process stopped after. Its credentials come from the same functions as `fedrec enrol` (simulation/enrol.py)."""

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedrec.shared.config import ConfigError, RunConfig
from fedrec.shared.data.catalogue import Catalogue
from fedrec.shared.data.population import open_population
from fedrec.shared.data.prepare import write_device_data
from fedrec.shared.policy import PrivacyPolicy, simulated_policy
from fedrec.shared.data.prepared import (
    CATALOGUE,
    MANIFEST,
    SERVER_FOLDER,
    refuse_inside_flower_app,
    write_server_folder,
)

from .credentials import TlsFiles, write_node_keys, write_tls
from .enrol import AUTHORITY_KEY, DEVICE_CERT, DEVICE_KEY, authority_hex, check_device, \
    create_authority, enrol_device
from .procs import free_port

log = logging.getLogger("fedrec.deploy")
CONNECTION = "fedrec-local"
START_TIMEOUT_S = 60.0
NODES_TIMEOUT_S = 120.0  # SuperNodes reconnect with a backoff after a SuperLink restart
# How often Flower's SuperExec (in the SuperLink and in each SuperNode) looks for a message waiting for an app process
# (default 1 s): every message of a deployment starts one, so each wave waited up to 1 s before its process started.
SUPEREXEC_POLL_INTERVAL_S = 0.25
REGISTER_AT_ONCE = 4  # `flwr supernode register` processes at a time (each ~1 s of CPU and ~100 MB)


def toml_value(value: Any) -> str:
    """A run-config or node-config value as TOML writes it: strings quoted, booleans lowercase."""
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
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SUPEREXEC_POLL_INTERVAL_S)}

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

    def stop_all(self, *, grace: float = 15.0) -> None:
        """SIGTERM to every process group at once, then wait for each (SIGKILL after `grace`): one shutdown wait."""
        for process in self.processes.values():
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for name in list(self.processes):
            process = self.processes[name]
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.stop(name, sig=signal.SIGKILL)  # reaps the group; a no-op signal where it has exited

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

    def authority(self) -> str:
        """The enrolment authority of this federation (out/credentials/authority, apart from the SuperLink's TLS
        files in out/credentials/tls): created on first use, kept across runs on the same `out`. Returns the
        pin (its public key as 64 hex digits)."""
        folder = self.out / "credentials" / "authority"
        if (folder / AUTHORITY_KEY).exists():
            return authority_hex(folder / AUTHORITY_KEY)
        return create_authority(folder).public_hex

    def device_identity(self, device_id: str, folder_name: str) -> tuple[Path, Path]:
        """(device.key, device.crt) of `device_id`, issued by this federation's authority as `fedrec enrol device`
        does (out/credentials/devices/<folder_name>); an identity issued on an earlier run is kept if it still
        checks out against the authority and the id."""
        pin = self.authority()
        folder = self.out / "credentials" / "devices" / folder_name
        key, cert = folder / DEVICE_KEY, folder / DEVICE_CERT
        if key.exists() and cert.exists():
            check_device(key, cert, pin, device_id)
            return key, cert
        enrol_device(self.out / "credentials" / "authority" / AUTHORITY_KEY, device_id, folder)
        return key, cert

    def register(self, public_keys: list[Path]) -> None:
        """Register the SuperNodes' public keys with the SuperLink, a few at a time (one `flwr` process each, ~1 s)."""
        failed: list[str] = []
        for start in range(0, len(public_keys), REGISTER_AT_ONCE):
            failed += self._register_batch(public_keys[start:start + REGISTER_AT_ONCE])
        if failed:
            raise RuntimeError("registering SuperNode keys failed: " + "; ".join(failed))

    def _register_batch(self, public_keys: list[Path], *, timeout: float = 120.0) -> list[str]:
        running: list[tuple[Path, subprocess.Popen]] = []
        failed = []
        try:
            for key in public_keys:
                running.append((key, subprocess.Popen([self.tool["flwr"], "supernode", "register", str(key),
                                                       CONNECTION], env=self.env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.PIPE, text=True)))
            deadline = time.monotonic() + timeout
            for key, process in running:
                try:
                    stdout, stderr = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    stdout, stderr = process.communicate()
                if process.returncode != 0 or "registered" not in stdout:
                    failed.append(f"{key.name}: {stdout[-500:]}{stderr[-500:]}")
        finally:  # an interrupt or a failed start leaves none of them behind
            for _, process in running:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return failed

    def start_supernode(self, name: str, private_key: Path, node_config: dict[str, Any]) -> subprocess.Popen:
        assert self.tls is not None
        config = " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())
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

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink lists as online (`flwr supernode list`)."""
        done = subprocess.run([self.tool["flwr"], "supernode", "list", CONNECTION, "--format", "json"], env=self.env,
                              capture_output=True, text=True, timeout=120)
        try:
            nodes = json.loads(done.stdout[done.stdout.index("{"):])["nodes"]
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"'flwr supernode list' printed no node list: {done.stdout[-500:]}"
                               f"{done.stderr[-500:]}") from None
        return sum(node.get("status") == "online" for node in nodes)

    def wait_online(self, count: int, *, timeout: float = NODES_TIMEOUT_S) -> int:
        """Wait until `count` SuperNodes are online (or `timeout` passes); returns how many are."""
        deadline = time.monotonic() + timeout
        while (online := self.online_nodes()) < count and time.monotonic() < deadline:
            time.sleep(1.0)
        if online < count:
            log.warning("%d of %d SuperNodes online after %.0fs; running with those", online, count, timeout)
        return online

    def run(self, run_config: dict[str, Any], *, timeout: float) -> subprocess.CompletedProcess:
        """`flwr run` of the installed fedrec app against the SuperLink; returns when the run has finished.

        It first waits for every SuperNode it started to be online: a deployed server waits only for
        min-devices devices and starts with whoever has said hello, and these are all meant to take part.
        """
        self.wait_online(sum(name.startswith("supernode-") and process.poll() is None
                             for name, process in self.processes.items()))
        app = write_flower_app(self.out / "app")
        pairs = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
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
             "[tool.flwr.app.config]", *(f"{k} = {toml_value(v)}" for k, v in RunConfig().to_mapping().items())]
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


@dataclass(frozen=True)
class DeploymentData:
    """Who gets what: the server its folder alone, each device the catalogue and its own events file."""

    server: Path  # catalogue.csv and a manifest of catalogue facts: all the ServerApp reads
    catalogue: Path  # the public catalogue every device gets
    devices: list[Path]  # devices[k]: device k's own events, given to its SuperNode only


def deployment_data(config: RunConfig, out: Path) -> DeploymentData:
    """The server folder out/server and the devices' files: a fedrec prepare folder's, or synthetic ones in out/data.

    The server folder is written apart from every device file (not inside a prepared folder), so nothing
    per device is reachable from it.
    """
    if config.dataset == "prepared":
        data = Path(config.data_path).resolve()
        if not (data / "devices").is_dir():
            raise ConfigError(f"data-path {data}: no devices/ folder; run fedrec prepare without --no-device-files")
        files = sorted((data / "devices").glob("*.csv"), key=_device_order)
        catalogue = data / CATALOGUE
        dataset = _dataset_name(data)
    elif config.dataset == "synthetic":
        data = out / "data"
        catalogue = data / CATALOGUE
        if catalogue.exists():
            files = [data / "devices" / f"{k}.csv" for k in range(config.synthetic_devices)]
        else:
            files = write_device_data(open_population(config), data)
        dataset = "synthetic"
    else:
        raise ConfigError(f"dataset '{config.dataset}': deploy-local takes synthetic data or a fedrec prepare folder "
                          "(dataset=prepared); prepare raw logs first")
    server = out / SERVER_FOLDER
    if not (server / MANIFEST).exists():
        write_server_folder(server, Catalogue.read_csv(catalogue), dataset=dataset)
    return DeploymentData(server=server, catalogue=catalogue,
                          devices=files[:config.devices] if config.devices else files)


def _dataset_name(data: Path) -> str:
    """The data set's name in a prepared folder's manifest ('prepared' where it names none)."""
    try:
        return str(json.loads((data / MANIFEST).read_text(encoding="utf-8"))["dataset"])
    except (OSError, ValueError, KeyError, TypeError):
        return "prepared"


def _device_order(path: Path) -> tuple[bool, int, str]:
    return (not path.stem.isdigit(), int(path.stem) if path.stem.isdigit() else 0, path.stem)


def server_run_config(config: RunConfig, server_folder: Path, run_dir: Path) -> dict[str, Any]:
    """The settings `flwr run` passes: those that differ from the defaults, and the deployment's own.

    data-path is the server folder (catalogue and manifest only). A deployed server does not use `devices`:
    it waits for min-devices devices to say hello and trains whoever has.
    """
    defaults = RunConfig().to_mapping()
    run_config = {k: v for k, v in config.to_mapping().items() if v != defaults[k] and k not in ("state-dir", "resume")}
    run_config.update({"dataset": "prepared", "data-path": str(server_folder), "out-dir": str(run_dir),
                       "baselines": False})
    return run_config


def write_policy_file(path: Path, policy: PrivacyPolicy) -> Path:
    """A device's privacy policy as a TOML file of policy keys (what its node config's policy-path names)."""
    lines = [f"{key} = {toml_value(value)}" for key, value in policy.to_mapping().items()]
    path.write_text("# this device's own privacy policy (fedrec deploy-local)\n" + "\n".join(lines) + "\n",
                    encoding="utf-8")
    return path


def device_id_of(path: Path) -> str:
    """deploy-local's device id for a device file: 'device-<stem>' (a real deployment chooses its own unique ids)."""
    return f"device-{path.stem}"


def start_devices(deployment: LocalDeployment, data: DeploymentData,
                  policy: PrivacyPolicy) -> dict[str, tuple[Path, dict]]:
    """Enrol each device, register its SuperNode key and start its SuperNode with only its own file, the catalogue,
    its identity and its policy.

    deploy-local plays the authority and the devices' owners too: each device gets a unique device-id
    ('device-<stem>'), a signing key and certificate from this federation's enrolment authority
    (out/credentials/authority), and its privacy policy (`policy`, pinning that authority as
    enrolment-authority) in its own settings, which the run config the server sends cannot change: a
    policy.toml in its state folder, named by its node config's policy-path (where `fedrec device status`
    finds it too). Returns name -> (private key, node config).
    """
    nodes = {}
    policy = replace(policy, enrolment_authority=deployment.authority())
    keys = {path: deployment.node_keys(device_id_of(path)) for path in data.devices}
    deployment.register([public for _, public in keys.values()])
    for path in data.devices:
        private, _ = keys[path]
        state = deployment.out / "devices" / path.stem
        state.mkdir(parents=True, exist_ok=True)
        identity_key, identity_cert = deployment.device_identity(device_id_of(path), path.stem)
        policy_file = write_policy_file(state / "policy.toml", policy)
        node_config = {"data-path": str(path), "catalogue-path": str(data.catalogue), "state-path": str(state),
                       "device-id": device_id_of(path), "identity-key": str(identity_key),
                       "identity-cert": str(identity_cert), "policy-path": str(policy_file)}
        deployment.start_supernode(f"supernode-{path.stem}", private, node_config)
        nodes[f"supernode-{path.stem}"] = (private, node_config)
    return nodes


def deploy_local(config: RunConfig, out: Path, *, timeout: float = 1800.0) -> dict[str, Any]:
    """Run `config` as a real federation on loopback: one SuperNode per device. Returns the run's summary."""
    out = Path(out).resolve()
    refuse_inside_flower_app(out, "deploy-local --out")
    data = deployment_data(config, out)
    run_dir = out / "run"
    with LocalDeployment(out) as deployment:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            deployment.start_superlink()
            start_devices(deployment, data, simulated_policy(config))
            log.info("%d SuperNodes started; running the app (progress in %s)", len(data.devices),
                     deployment.logs / "flwr-run.log")
            deployment.run(server_run_config(config, data.server, run_dir), timeout=timeout)
        finally:
            signal.signal(signal.SIGTERM, previous)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the run ended without {summary_path}; see {out / 'logs'}")
    return json.loads(summary_path.read_text())


def format_deployment(summary: dict[str, Any]) -> str:
    """What a deployment can say of its run: who took part, the devices' own federated metrics where asked for,
    and the privacy spent; never a central quality figure (its server holds no one's data to evaluate on)."""
    from fedrec.shared.evaluation import DEVICE_METRIC_KEYS

    from .runner import privacy_lines

    lines = [f"deployment: {summary['devices']} devices said hello, {summary['items']} items, "
             f"{summary['rounds']} rounds"]
    federated = summary.get("federated_eval") or {}
    if federated:
        figures = ", ".join(f"{k} {federated[k]:.4f}" for k in DEVICE_METRIC_KEYS if federated.get(k) is not None)
        lines.append(f"federated evaluation on {federated.get('devices', '?')} devices (each on its own held-out "
                     f"items, noised on the device and charged to its budget): {figures}")
    lines.append("no central quality metrics: a deployment's server holds no one's data to evaluate on (central "
                 "evaluation and the baselines are a simulation feature: fedrec simulate)"
                 + ("" if federated else "; for federated ones add --run-config federated-eval=true (each device "
                    "evaluates on its own held-out items, noised on the device and charged to its budget)"))
    lines += privacy_lines(summary)
    lines.append(f"run directory: {summary['run_dir']}  ({summary['seconds']['total']:.0f}s)")
    return "\n".join(lines)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

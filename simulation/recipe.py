"""`fedrec deploy-local --print-commands`: the commands each machine of a real deployment runs, in order.

One folder under OUT stands for each machine (the enrolment authority, the operator's SuperLink machine,
each device); `cp` stands for however a file travels between two of them. Every command is one line a
shell runs as printed; one that ends in `&` keeps running (the SuperLink, each SuperNode). The devices'
raw logs and the public item metadata, which a real deployment already has, are written here as the
recipe's inputs: each device's log only into that device's folder.
"""

from __future__ import annotations

import csv
import shlex
from dataclasses import dataclass
from pathlib import Path

from fedrec.shared.config import ConfigError, RunConfig
from fedrec.shared.data.catalogue import Catalogue
from fedrec.shared.data.interactions import DeviceEvents
from fedrec.shared.data.population import open_population
from fedrec.shared.data.prepared import refuse_inside_flower_app
from fedrec.shared.policy import PrivacyPolicy, simulated_policy

from .deploy import toml_value, server_run_config, write_flower_app
from .procs import free_port

CONNECTION = "fedrec"
LOG_COLUMNS = "user=user_id,item=item_id,time=timestamp,weight=weight"  # the raw logs written as inputs


@dataclass(frozen=True)
class Step:
    """One line of the recipe: a command (or a comment, where `command` is empty) on one machine."""

    machine: str  # authority, operator, devices (a header for all of them) or one device's id
    command: str = ""
    comment: str = ""


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _write_inputs(config: RunConfig, out: Path) -> tuple[Catalogue, list[str]]:
    """The public item metadata (operator/items.csv) and each device's own raw log (device-<k>/raw.csv)."""
    population = open_population(config)
    count = min(config.devices, population.num_devices) if config.devices else population.num_devices
    catalogue = population.catalogue()
    (out / "operator").mkdir(parents=True)
    with open(out / "operator" / "items.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("item_id", "title", "category"))
        for i, item_id in enumerate(catalogue.item_ids):
            writer.writerow((item_id, catalogue.titles[i] if catalogue.titles else "",
                             catalogue.categories[i] if catalogue.categories else ""))
    names = []
    for k in range(count):
        name = f"device-{k}"
        (out / name).mkdir()
        _write_raw_log(out / name / "raw.csv", name, population.device_events(k), catalogue)
        names.append(name)
    return catalogue, names


def _write_raw_log(path: Path, user: str, events: DeviceEvents, catalogue: Catalogue) -> None:
    """A device's log as an app would export it: its user id, item ids, times and weights."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("user_id", "item_id", "timestamp", "weight"))
        writer.writerows((user, catalogue.item_ids[int(i)], int(t), f"{w:g}")
                         for i, t, w in zip(events.items, events.times, events.weights))


def _policy_lines(policy: PrivacyPolicy) -> list[str]:
    """The device's policy keys that differ from the defaults, and its budget and delta always."""
    defaults = PrivacyPolicy().to_mapping()
    return [f"{k} = {toml_value(v)}" for k, v in policy.to_mapping().items()
            if k in ("epsilon-budget", "max-delta") or (v != defaults[k] and k != "enrolment-authority")]


def _node_config(here: Path, device_id: str) -> str:
    """The device's --node-config: its own files, its id, its identity and its policy file."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in {
        "data-path": str(here / "events.csv"), "catalogue-path": str(here / "catalogue.csv"),
        "state-path": str(here / "state"), "device-id": device_id,
        "identity-key": str(here / "identity" / "device.key"), "identity-cert": str(here / "identity" / "device.crt"),
        "policy-path": str(here / "state" / "policy.toml")}.items())


def _printf(lines: list[str], path: Path, *, raw: str = "") -> str:
    """A command writing `lines` (and `raw`, a shell word expanded when it runs) to `path`, one a line."""
    return "printf '%s\\n' " + " ".join(_q(line) for line in lines) + (f" {raw}" if raw else "") + f" > {_q(path)}"


def deployment_recipe(config: RunConfig, out: Path, *, host: str = "127.0.0.1") -> list[Step]:
    """Write the recipe's inputs and the app folder under `out` (a new or empty folder); return its steps."""
    out = Path(out).resolve()
    refuse_inside_flower_app(out, "deploy-local --out")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: not empty; --print-commands writes the recipe's folders there: choose a "
                          "new folder")
    _, devices = _write_inputs(config, out)
    authority, operator = out / "authority", out / "operator"
    app = write_flower_app(operator / "app")
    port = free_port()
    superlink = f"{host}:{port}"
    op_home = operator / "flwr-home"
    flwr = f"FLWR_HOME={_q(op_home)} flwr"
    steps = [Step("authority", comment="1. the enrolment authority: a machine that is not the aggregating server"),
             Step("authority", f"fedrec enrol authority --out {_q(authority)}"),
             Step("authority", f"mkdir -p {_q(authority / 'requests')}"),
             Step("operator", comment="2. the operator's SuperLink machine: the public catalogue from item metadata, "
                                      "TLS, the SuperLink"),
             Step("operator", f"fedrec catalogue --items {_q(operator / 'items.csv')} --columns "
                              f"item=item_id,title=title,category=category --name {config.dataset} "
                              f"--out {_q(operator / 'server')}"),
             Step("operator", f"fedrec enrol tls --out {_q(operator / 'tls')} --host {host}"),
             Step("operator", f"mkdir -p {_q(op_home)} {_q(operator / 'node-keys')}"),
             Step("operator", _printf(["[superlink]", f'default = "{CONNECTION}"', f"[superlink.{CONNECTION}]",
                                       f'address = "{superlink}"',
                                       f'root-certificates = "{operator / "tls" / "ca.crt"}"'],
                                      op_home / "config.toml")),
             Step("operator", f"FLWR_HOME={_q(op_home)} flower-superlink --ssl-ca-certfile "
                              f"{_q(operator / 'tls' / 'ca.crt')} --ssl-certfile {_q(operator / 'tls' / 'server.pem')} "
                              f"--ssl-keyfile {_q(operator / 'tls' / 'server.key')} --enable-supernode-auth "
                              f"--host {host} --port {port} --database {_q(operator / 'superlink.db')} "
                              "--disable-runtime-dependency-installation &"),
             Step("operator", f"for i in $(seq 60); do {flwr} supernode list {CONNECTION} >/dev/null 2>&1 && break; "
                              "sleep 1; done")]
    policy = simulated_policy(config)
    for name in devices:
        here = out / name
        steps += [
            Step(name, comment=f"3. device {name}: its training file from its own log, its keys, its policy"),
            Step(name, f"cp {_q(operator / 'server' / 'catalogue.csv')} {_q(here / 'catalogue.csv')}"),
            Step(name, f"cp {_q(operator / 'tls' / 'ca.crt')} {_q(here / 'ca.crt')}"),
            Step(name, f"cp {_q(authority / 'authority.pub')} {_q(here / 'authority.pub')}"),
            Step(name, f"fedrec device prepare --log {_q(here / 'raw.csv')} --columns {LOG_COLUMNS} --catalogue "
                       f"{_q(here / 'catalogue.csv')} --out {_q(here / 'events.csv')}"),
            Step(name, f"fedrec device keygen --out {_q(here / 'identity')}"),
            Step(name, f"fedrec enrol node-key --out {_q(here / 'node-key')} --name {name}"),
            Step(name, f"mkdir -p {_q(here / 'state')} {_q(here / 'flwr-home')}"),
            Step(name, _printf(_policy_lines(policy), here / "state" / "policy.toml",
                               raw=f'"enrolment-authority = \\"$(cat {_q(here / "authority.pub")})\\""')),
            Step(name, f"cp {_q(here / 'identity' / 'device.pub')} {_q(authority / 'requests' / (name + '.pub'))}"),
            Step(name, f"cp {_q(here / 'node-key' / (name + '.pub'))} {_q(operator / 'node-keys' / (name + '.pub'))}"),
        ]
    steps.append(Step("authority", comment="4. the enrolment authority certifies each device's public key"))
    for name in devices:
        steps += [Step("authority", f"fedrec enrol device --authority {_q(authority / 'authority.key')} --device-id "
                                    f"{name} --public-key {_q(authority / 'requests' / (name + '.pub'))} --out "
                                    f"{_q(authority / 'issued' / name)}"),
                  Step("authority", f"cp {_q(authority / 'issued' / name / 'device.crt')} "
                                    f"{_q(out / name / 'identity' / 'device.crt')}")]
    steps.append(Step("operator", comment="5. the operator registers each device's SuperNode key"))
    steps += [Step("operator", f"{flwr} supernode register {_q(operator / 'node-keys' / (name + '.pub'))} "
                               f"{CONNECTION}") for name in devices]
    steps.append(Step("devices", comment="6. each device starts its SuperNode (--port only because these devices "
                                         "share one machine here)"))
    for name in devices:
        here = out / name
        steps.append(Step(name, f"FLWR_HOME={_q(here / 'flwr-home')} flower-supernode --root-certificates "
                                f"{_q(here / 'ca.crt')} --superlink {superlink} --auth-supernode-private-key "
                                f"{_q(here / 'node-key' / name)} --port {free_port()} --node-config "
                                f"{_q(_node_config(here, name))} &"))
    run_config = server_run_config(config, operator / "server", operator / "run")
    run_config["min-devices"] = len(devices)  # the server waits until every device has said hello
    pairs = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    steps += [Step("operator", comment="7. the operator runs the app; it ends when the run has finished"),
              Step("operator", f"{flwr} run {_q(app)} {CONNECTION} --stream --run-config {_q(pairs)}"),
              Step(devices[0], comment="8. on a device, after the run: its own privacy figures and recommendations"),
              Step(devices[0], f"fedrec device status --state-path {_q(out / devices[0] / 'state')}"),
              Step(devices[0], f"fedrec device recommend --state-path {_q(out / devices[0] / 'state')} --catalogue "
                               f"{_q(out / devices[0] / 'catalogue.csv')} -k 5")]
    return steps


def format_recipe(steps: list[Step], out: Path) -> str:
    """The recipe as a shell script: a comment naming each section's machine, one command a line."""
    lines = ["#!/usr/bin/env bash",
             f"# A deployment of {sum(s.command.startswith('fedrec device prepare') for s in steps)} devices, one "
             f"folder per machine under {Path(out).resolve()}: authority/ (the enrolment authority), operator/ (the",
             "# SuperLink, the public catalogue, the run), device-<k>/ (one device: its own raw.csv, keys, state).",
             "# 'cp' stands for however a file travels between two machines. A line ending in '&' keeps running:",
             "# stop the SuperLink and the SuperNodes when the run has finished. Written as inputs: operator/items.csv",
             "# (public item metadata) and each device's own device-<k>/raw.csv; operator/app (the Flower app).",
             "set -e"]
    for step in steps:
        if step.comment:
            lines += ["", f"# == {step.comment} =="]
        else:
            lines.append(step.command)
    return "\n".join(lines)

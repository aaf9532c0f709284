"""The `fedrec` command: simulate, prepare, audit, report, scale, bench, deploy-local, catalogue; `enrol` (the
operator's credentials) and `device` (run on a device: prepare, status, recommend, keygen)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedrec.shared.config import PRIVACY_MODES, ConfigError, RunConfig
from fedrec.shared.data.interactions import DataError
from fedrec.shared.state import StateError

from .config_help import config_help, format_config_keys, show_defaults

log = logging.getLogger("fedrec")

# Flags of `fedrec simulate` and the run-config keys they set.
SIMULATE_FLAGS = {"dataset": "dataset", "data_path": "data-path", "rounds": "rounds", "devices": "devices",
                  "devices_per_round": "devices-per-round", "noise_multiplier": "noise-multiplier",
                  "epsilon_budget": "epsilon-budget", "seed": "seed", "out": "out-dir",
                  "engine": "simulation-engine", "shards": "simulation-shards", "ray_address": "ray-address",
                  "privacy": "privacy"}


def parse_run_config(values: Sequence[str]) -> dict[str, Any]:
    """`--run-config` values: TOML files (flat, or with [tool.flwr.app.config]) or inline `key=value` pairs."""
    out: dict[str, Any] = {}
    for value in values:
        path = Path(value)
        if path.is_file():
            try:
                doc = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as err:
                raise ConfigError(f"{path}: not a readable TOML file ({err})") from None
            out.update(doc.get("tool", {}).get("flwr", {}).get("app", {}).get("config", doc))
            continue
        for pair in value.split():
            key, sep, raw = pair.partition("=")
            if not sep or not key:
                raise ConfigError(f"--run-config: '{pair}' is neither a file nor key=value")
            try:
                out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                out[key.strip()] = raw
    return out


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config keys `fedrec simulate` was given: --run-config values, then data flags, then the other flags."""
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    mapping = parse_run_config(args.run_config or [])
    mapping.update(data_overrides(args))
    for attr, key in SIMULATE_FLAGS.items():
        if getattr(args, attr) is not None:
            mapping[key] = getattr(args, attr)
    mapping["resume"] = bool(args.resume)
    return mapping


def cmd_simulate(args: argparse.Namespace) -> int:
    from .api import simulate

    # The same path as the Python API: settings checked by run_config, run and read back by simulate.
    result = simulate(settings_from_args(args), no_dp=args.no_dp, verbose=args.verbose)
    print(result.table())
    return 0


DATA_FLAGS = {"columns": "columns", "separator": "separator", "encoding": "encoding",
              "event_weights": "event-weights", "min_weight": "min-weight", "min_user_items": "min-user-items",
              "min_item_users": "min-item-users"}


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    help_of = config_help()
    parser.add_argument("--columns", help=help_of["columns"])
    parser.add_argument("--separator", help=help_of["separator"])
    parser.add_argument("--encoding", help=help_of["encoding"])
    parser.add_argument("--event-weights", help=help_of["event-weights"])
    parser.add_argument("--min-weight", type=float, help=help_of["min-weight"])
    parser.add_argument("--min-user-items", type=int, help=help_of["min-user-items"])
    parser.add_argument("--min-item-users", type=int, help=help_of["min-item-users"])
    parser.add_argument("--skip-bad-rows", action="store_true", help=help_of["skip-bad-rows"])


def data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {key: getattr(args, attr) for attr, key in DATA_FLAGS.items() if getattr(args, attr) is not None}
    if args.skip_bad_rows:
        out["skip-bad-rows"] = True
    return out


def cmd_prepare(args: argparse.Namespace) -> int:
    from fedrec.shared.data.loaders import load_dataset
    from fedrec.shared.data.prepare import PrepareSettings, check_output_folder, prepare_log
    from fedrec.shared.data.prepared import SERVER_FOLDER, refuse_inside_flower_app

    config = RunConfig.from_mapping({"dataset": args.dataset, "data-path": args.data_path, **data_overrides(args)},
                                    source="fedrec prepare")
    settings = PrepareSettings(min_user_items=config.min_user_items, min_item_users=config.min_item_users,
                               device_files=not args.no_device_files)
    out = Path(args.out)
    refuse_inside_flower_app(out, "--out")  # before reading the raw data: fail fast
    check_output_folder(out, replace=args.replace)
    stats = prepare_log(load_dataset(config), out, dataset=args.dataset, settings=settings, replace=args.replace)
    print(f"prepared {stats['devices']} devices, {stats['items']} items, {stats['events']} events in {out}; "
          f"the server's folder (catalogue and manifest only) is {out / SERVER_FOLDER}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from fedrec.server.records import dumps

    from .api import audit

    if not args.run_dir and not args.attacks:
        raise ConfigError("fedrec audit: give a RUN_DIR to audit, --attacks, or both")
    result: dict = {}
    attacks: dict | None = None
    if args.attacks:  # first, so the audit's report can include RUN/audit-attacks.json
        from .attacks import ATTACKS_FILE, attack_federation, attack_report

        config, from_run = attack_federation(args.run_dir, parse_run_config(args.run_config or []))
        attacks = attack_report(config, from_audited_run=from_run)
        where = Path(args.run_dir) if args.run_dir else Path(args.out or "audit-attacks")
        where.mkdir(parents=True, exist_ok=True)
        (where / ATTACKS_FILE).write_text(dumps(attacks, indent=2) + "\n", encoding="utf-8")
        log.info("attacks: wrote %s", where / ATTACKS_FILE)
    if args.run_dir:
        out = Path(args.out) if args.out else Path(args.run_dir) / "audit"
        result = audit(args.run_dir, tolerance=args.tolerance, out=out)
        log.info("audit %s: %d flags; wrote %s", result["verdict"], len(result["flags"]), out)
    if attacks is not None:
        result = {**result, "attacks": attacks} if args.run_dir else attacks
    if args.json:
        print(dumps(result, indent=2))
    else:
        print(format_audit(result, attacks_only=not args.run_dir))
    failed = args.run_dir and result.get("verdict") == "fail"
    return 1 if failed else 0


def format_audit(result: dict, *, attacks_only: bool) -> str:
    lines = []
    if not attacks_only:  # every figure by unit and threat, then the flags
        from fedrec.server.audit_report import verdict_lines

        lines += verdict_lines(result)
    attacks = result if attacks_only else result.get("attacks")
    if attacks:
        from .attacks import format_attacks

        lines += format_attacks(attacks)
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    from .api import report

    mapping = {"dataset": args.dataset, "data-path": args.data_path or "", **parse_run_config(args.run_config or []),
               **data_overrides(args)}
    for attr, key in (("rounds", "rounds"), ("devices", "devices"), ("devices_per_round", "devices-per-round"),
                      ("seed", "seed")):
        if getattr(args, attr) is not None:
            mapping[key] = getattr(args, attr)
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    modes = [m.strip() for m in args.privacy.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"local", "distributed", "user"})
    if unknown or not modes:
        raise ConfigError(f"--privacy {args.privacy!r}: expected a comma-separated list of local, distributed, user")
    print(report(mapping, out=args.out, epsilons=epsilons, title=args.title or "", modes=modes).markdown)
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from .scale import ScaleGrid, make_scale

    mapping = {**parse_run_config(args.run_config or [])}
    for attr, key in (("rounds", "rounds"), ("devices_per_round", "devices-per-round"), ("seed", "seed"),
                      ("items", "synthetic-items")):
        if getattr(args, attr) is not None:
            mapping[key] = getattr(args, attr)
    base = RunConfig.from_mapping(mapping)

    def listed(flag: str, text: str, kind: Any) -> tuple:
        try:
            return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"--{flag} {text!r}: expected a comma-separated list of {kind.__name__} "
                              "values") from None

    grid = ScaleGrid(populations=listed("populations", args.populations, int),
                     cohorts=listed("cohorts", args.cohorts, str), modes=listed("modes", args.modes, str),
                     epsilons=listed("epsilons", args.epsilons, float))
    paths = make_scale(base, grid, out=Path(args.out))
    print(paths[0].read_text(encoding="utf-8"))
    print(f"written: {', '.join(str(p) for p in paths)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_command

    return bench_command(args)


def cmd_recommend(args: argparse.Namespace) -> int:
    from fedrec.client.recommend import recommend

    if args.command == "recommend":  # the old name
        print("note: `fedrec recommend` moved to `fedrec device recommend` (same options)", file=sys.stderr)
    picks, server_round = recommend(Path(args.state_path), Path(args.catalogue), k=args.k,
                                    data_path=Path(args.data_path) if args.data_path else None)
    print(f"top {len(picks)} for this device (item model of round {server_round}; items it already has left out)")
    for rank, pick in enumerate(picks, 1):
        print(f"{rank:>3}. {pick.label}  [item {pick.item_id}, score {pick.score:.3f}]")
    return 0


def cmd_device_status(args: argparse.Namespace) -> int:
    from fedrec.client.status import device_status, format_status
    from fedrec.server.records import dumps

    if bool(args.state_path) == bool(args.state_dir):
        raise ConfigError("fedrec device status: give --state-path DIR (a deployed device's state folder) or "
                          "--state-dir DIR --device-id ID (a simulated device of a run), not both")
    if args.state_dir and not args.device_id:
        raise ConfigError("fedrec device status --state-dir: also give --device-id (e.g. sim-3)")
    status = device_status(state_path=Path(args.state_path) if args.state_path else None,
                           state_dir=Path(args.state_dir) if args.state_dir else None, device_id=args.device_id,
                           policy_path=Path(args.policy) if args.policy else None)
    print(dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_device_prepare(args: argparse.Namespace) -> int:
    from fedrec.shared.data.catalogue import Catalogue
    from fedrec.shared.data.device_log import DevicePrepareSettings, prepare_device_log
    from fedrec.shared.data.loaders import load_dataset

    if args.min_item_users is not None:
        raise ConfigError("fedrec device prepare: --min-item-users counts devices per item, which one device cannot "
                          "see; its items outside the catalogue are dropped instead (the operator's catalogue, from "
                          "public metadata, decides which items exist)")
    config = RunConfig.from_mapping({"dataset": args.dataset, "data-path": args.data_path, **data_overrides(args)},
                                    source="fedrec device prepare")
    catalogue = Catalogue.read_csv(Path(args.catalogue))  # before the log: a wrong catalogue fails fast
    stats = prepare_device_log(load_dataset(config), catalogue, Path(args.out), settings=DevicePrepareSettings(
        min_user_items=config.min_user_items, user=args.user, replace=args.replace))
    print(f"wrote {args.out}: {stats['events']} events on {stats['items']} catalogue items; dropped "
          f"{stats['events_outside_catalogue']} events of {stats['items_outside_catalogue']} items outside the "
          f"catalogue, merged {stats['duplicates_merged']} repeats"
          + (f", left out {stats['events_of_other_users']} events of other users" if args.user else "")
          + f"\nits SuperNode's node config: data-path=\"{Path(args.out).resolve()}\" "
          f"catalogue-path=\"{Path(args.catalogue).resolve()}\"")
    return 0


def cmd_catalogue(args: argparse.Namespace) -> int:
    from fedrec.shared.data.prepared import CATALOGUE, write_server_folder
    from fedrec.shared.data.public_catalogue import parse_metadata_columns, read_item_metadata

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty folder; the server folder holds only the "
                          "catalogue and its manifest: choose a new folder")
    separator = {"\\t": "\t", "tab": "\t"}.get(args.separator, args.separator)
    catalogue = read_item_metadata(Path(args.items), parse_metadata_columns(args.columns), separator=separator,
                                   encoding=args.encoding)
    write_server_folder(out, catalogue, dataset=args.name)
    print(f"wrote {out / CATALOGUE} ({catalogue.num_items} items, from public metadata only) and its manifest: "
          f"{out} is the server's data-path; ship {out / CATALOGUE} to every device (fedrec device prepare "
          "--catalogue)")
    return 0


def cmd_device_keygen(args: argparse.Namespace) -> int:
    from .enrol import device_keygen

    key, public = device_keygen(Path(args.out))
    print(f"wrote {key} (the device's signing key, mode 0600: it never leaves this device)\n"
          f"wrote {public} (send it to the enrolment authority: fedrec enrol device --public-key {public.name} "
          "--device-id ID ...)")
    return 0


def cmd_enrol_authority(args: argparse.Namespace) -> int:
    from .enrol import create_authority

    files = create_authority(Path(args.out))
    print(f"wrote {files.key} (the authority's private key, mode 0600: keep it on this machine, never on the "
          f"aggregating server)\nwrote {files.pub} (its public key)\n"
          f"pin it on every device, in the device's own policy:\n"
          f"enrolment-authority=\"{files.public_hex}\"")
    return 0


def cmd_enrol_device(args: argparse.Namespace) -> int:
    from .enrol import enrol_device

    files = enrol_device(Path(args.authority), args.device_id, Path(args.out),
                         public_key=Path(args.public_key) if args.public_key else None, valid_days=args.days)
    if files.key is not None:
        print(f"wrote {files.key} (device {files.device_id}'s signing key, mode 0600: copy it to that device only, "
              "then delete it here)")
    print(f"wrote {files.cert} (certificate for device-id {files.device_id!r}, {args.days} days, issued by "
          f"authority {files.authority_hex[:16]}...)\n"
          f"on the device, node config: device-id=\"{files.device_id}\" identity-key=\"<path of device.key>\" "
          f"identity-cert=\"<path of device.crt>\" enrolment-authority=\"{files.authority_hex}\"")
    return 0


def cmd_enrol_tls(args: argparse.Namespace) -> int:
    from .enrol import enrol_tls

    files = enrol_tls(Path(args.out), args.host, valid_days=args.days)
    print(f"wrote {files.ca_cert} (the CA certificate: every SuperNode's --root-certificates and the flwr CLI's "
          f"root-certificates)\nwrote {files.server_cert} and {files.server_key} (mode 0600), for the SuperLink "
          f"only: flower-superlink --ssl-ca-certfile {files.ca_cert.name} --ssl-certfile {files.server_cert.name} "
          f"--ssl-keyfile {files.server_key.name}\nsubject alternative names: {', '.join(args.host)}; valid "
          f"{args.days} days; the CA's private key was not kept")
    return 0


def cmd_enrol_node_key(args: argparse.Namespace) -> int:
    from .enrol import enrol_node_key

    private, public = enrol_node_key(Path(args.out), args.name)
    print(f"wrote {private} (SuperNode key, mode 0600: the device's --auth-supernode-private-key)\n"
          f"wrote {public} (register it at the SuperLink: flwr supernode register {public.name} CONNECTION)")
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from .deploy import deploy_local, format_deployment

    mapping = parse_run_config(args.run_config or [])
    mapping.update({k: v for k, v in (("devices", args.devices), ("rounds", args.rounds),
                                      ("devices-per-round", args.devices_per_round), ("dataset", args.dataset),
                                      ("data-path", args.data_path), ("privacy", args.privacy)) if v is not None})
    if args.devices < 1 and mapping.get("dataset", "synthetic") == "synthetic":
        # one SuperNode per device: 0 means every device of a prepared folder, but a synthetic one has no 'every'
        raise ConfigError(f"--devices {args.devices}: a synthetic deployment needs at least 1")
    mapping.setdefault("devices-per-round", args.devices or RunConfig.devices_per_round)
    config = RunConfig.from_mapping(mapping, source="deploy-local")
    if args.print_commands:
        from .recipe import deployment_recipe, format_recipe

        print(format_recipe(deployment_recipe(config, Path(args.out)), Path(args.out)))
        return 0
    print(format_deployment(deploy_local(config, Path(args.out))))
    return 0


class _VersionAction(argparse.Action):
    """`fedrec --version`: the versions are read only when asked (package metadata costs ~0.1 s)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from fedrec.shared.provenance import version_text

        print(version_text())
        parser.exit()


def cmd_config(args: argparse.Namespace) -> int:
    from fedrec.shared.policy import PrivacyPolicy

    run_config, policy = not args.policy or args.run_config, not args.run_config or args.policy
    known = {d["key"] for d in RunConfig.describe()} | {d["key"] for d in PrivacyPolicy.describe()}
    unknown = sorted(set(args.keys) - known)
    if unknown:
        from fedrec.shared.config import unknown_keys_message

        raise ConfigError(unknown_keys_message("fedrec config", unknown, sorted(known)))
    if args.json:
        import json

        out = {}
        if run_config:
            out["run_config"] = [d for d in RunConfig.describe() if not args.keys or d["key"] in args.keys]
        if policy:
            out["policy"] = [d for d in PrivacyPolicy.describe() if not args.keys or d["key"] in args.keys]
        print(json.dumps(out, indent=2))
    else:
        print(format_config_keys(run_config=run_config, policy=policy, keys=args.keys))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrec", description="Federated recommender with differential privacy.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print fedrec's version and its privacy-relevant dependencies', and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", help="also show Flower's and Ray's logs")
    sub = parser.add_subparsers(dest="command", required=True)
    help_of = config_help()

    sim = sub.add_parser("simulate", parents=[common], help="run a federated simulation and print the result table")
    sim.add_argument("--dataset", help=help_of["dataset"])
    sim.add_argument("--data-path", help=help_of["data-path"])
    sim.add_argument("--rounds", type=int, help=help_of["rounds"])
    sim.add_argument("--devices", type=int, help=help_of["devices"])
    sim.add_argument("--devices-per-round", type=int, help=help_of["devices-per-round"])
    sim.add_argument("--no-dp", action="store_true", help="train without differential privacy (baseline): sets the "
                                                          "plans and the devices' policy (allow-no-dp=true)")
    sim.add_argument("--noise-multiplier", help=help_of["noise-multiplier"])
    sim.add_argument("--epsilon-budget", type=float, help=help_of["epsilon-budget"])
    sim.add_argument("--privacy", choices=PRIVACY_MODES, help=help_of["privacy"])
    sim.add_argument("--seed", type=int, help=help_of["seed"])
    sim.add_argument("--out", help="run directory (default runs/<timestamp>)")
    sim.add_argument("--engine", choices=("cohort", "device"), help=help_of["simulation-engine"])
    sim.add_argument("--shards", type=int, help=help_of["simulation-shards"])
    sim.add_argument("--ray-address", help=help_of["ray-address"])
    sim.add_argument("--run-config", action="append", metavar="FILE_OR_PAIRS",
                     help="more settings: a TOML file or 'key=value key=value' (keys as in pyproject.toml)")
    sim.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_data_flags(sim)
    sim.set_defaults(func=cmd_simulate)

    audit = sub.add_parser("audit", parents=[common], help="recompute and check a run's privacy claims; attack checks")
    audit.add_argument("run_dir", nargs="?", help="a run directory (its ledger and config are audited)")
    audit.add_argument("--attacks", action="store_true",
                       help="also run the empirical attacks of the run's privacy mode on a federation with the "
                            "audited run's settings (without RUN_DIR: a small synthetic one; --run-config overrides); "
                            "writes RUN/audit-attacks.json (minutes)")
    audit.add_argument("--json", action="store_true", help="print the machine-readable verdict")
    audit.add_argument("--out", help="where to write audit.md/json, plots (default RUN_DIR/audit)")
    audit.add_argument("--tolerance", type=float, default=1e-3,
                       help="relative difference allowed between reported and recomputed epsilon")
    audit.add_argument("--run-config", action="append", metavar="FILE_OR_PAIRS",
                       help="settings of the attack federation (keys as in pyproject.toml)")
    audit.set_defaults(func=cmd_audit)

    report = sub.add_parser("report", parents=[common], help="privacy-utility report: baselines, central DP, "
                                                             "federated with and without DP on the same split")
    report.add_argument("--dataset", default="synthetic", help=help_of["dataset"])
    report.add_argument("--data-path", help=help_of["data-path"])
    report.add_argument("--out", required=True, help="folder for report.md/csv/json/png")
    report.add_argument("--epsilons", default="1,2,4,8", help="per-device budgets to run (comma-separated)")
    report.add_argument("--rounds", type=int, help=help_of["rounds"])
    report.add_argument("--devices", type=int, help=help_of["devices"])
    report.add_argument("--devices-per-round", type=int, help=help_of["devices-per-round"])
    report.add_argument("--seed", type=int, help=help_of["seed"])
    report.add_argument("--title", help="title of the report (default: the data set's name)")
    report.add_argument("--privacy", default="local",
                        help="privacy modes of the federated + DP rows, comma-separated (a row group per mode), "
                             "e.g. local,distributed,user")
    report.add_argument("--run-config", action="append", metavar="FILE_OR_PAIRS", help="more settings")
    add_data_flags(report)
    report.set_defaults(func=cmd_report)

    scale = sub.add_parser("scale", parents=[common], help="HR@10 against the number of devices: synthetic populations "
                                                           "of growing size, one catalogue, per mode and epsilon")
    scale.add_argument("--out", required=True, help="folder for scale.csv/md/json/png (a grid resumes from its csv)")
    scale.add_argument("--populations", default="1000,10000,100000", help="population sizes (comma-separated)")
    scale.add_argument("--cohorts", default="default,0.1",
                       help="devices a round: 'default' (devices-per-round) and/or shares of the population")
    scale.add_argument("--modes", default="user,distributed,local",
                       help="privacy modes (comma-separated; 'none' adds the run without DP)")
    scale.add_argument("--epsilons", default="1,4,8", help="per-device budgets (comma-separated)")
    scale.add_argument("--rounds", type=int, help=help_of["rounds"])
    scale.add_argument("--devices-per-round", type=int, help="the 'default' cohort (default: 100)")
    scale.add_argument("--items", type=int, help=help_of["synthetic-items"])
    scale.add_argument("--seed", type=int, help=help_of["seed"])
    scale.add_argument("--run-config", action="append", metavar="FILE_OR_PAIRS", help="more settings")
    scale.set_defaults(func=cmd_scale)

    bench = sub.add_parser("bench", parents=[common], help="time the Flower simulation against the plain loop: "
                                                           "startup, round times, per-update cost, memory, bytes")
    bench.add_argument("--devices-per-round", type=int, help="devices trained per round (default 10)")
    bench.add_argument("--population", type=int, help="synthetic devices (default 1000)")
    bench.add_argument("--items", type=int, help="synthetic catalogue size (default 1000)")
    bench.add_argument("--dim", type=int, help="embedding dimension (default 32)")
    bench.add_argument("--dp", action=argparse.BooleanOptionalAction,
                       help="record-level DP on or off (default on): --dp is --privacy local, --no-dp --privacy none")
    bench.add_argument("--privacy", choices=PRIVACY_MODES, help=help_of["privacy"] + " (default local)")
    bench.add_argument("--rounds", type=int, default=4, help="training rounds; round 1 is reported apart, the "
                                                             "median of the others is the steady round time")
    bench.add_argument("--engine", choices=("cohort", "device"), default="cohort", help=help_of["simulation-engine"])
    bench.add_argument("--grid", action="store_true", help="run the default grid of cells, each in its own process")
    bench.add_argument("--json", action="store_true", help="print the cells as JSON (the table goes to stderr)")
    bench.add_argument("--out", help="also write DIR/bench.json")
    bench.set_defaults(func=cmd_bench)

    dep = sub.add_parser("deploy-local", parents=[common], help="a real deployment on loopback: SuperLink with TLS "
                                                                "and SuperNode authentication, one SuperNode per device")
    dep.add_argument("--devices", type=int, required=True, help="SuperNodes to start, one device each")
    dep.add_argument("--rounds", type=int, help=help_of["rounds"])
    dep.add_argument("--devices-per-round", type=int, help="devices sampled per round (default: all)")
    dep.add_argument("--dataset", choices=("synthetic", "prepared"), help="synthetic (default) or a fedrec prepare "
                                                                          "folder with devices/")
    dep.add_argument("--data-path", help="the prepared folder (with --dataset prepared)")
    dep.add_argument("--out", required=True, help="folder for data, credentials, device state, logs and the run")
    dep.add_argument("--privacy", choices=PRIVACY_MODES, help=help_of["privacy"])
    dep.add_argument("--run-config", action="append", metavar="FILE_OR_PAIRS", help="more settings")
    dep.add_argument("--print-commands", action="store_true",
                     help="print the commands each machine of a real deployment runs (enrolment authority, "
                          "SuperLink, each device, the run), in order, with its inputs written under --out, and exit")
    dep.set_defaults(func=cmd_deploy_local)

    enrol = sub.add_parser("enrol", help="operator credentials: the enrolment authority, device certificates, the "
                                         "SuperLink's TLS files, SuperNode keys")
    enrol_sub = enrol.add_subparsers(dest="enrol_command", required=True)
    auth = enrol_sub.add_parser("authority", parents=[common],
                                help="create the enrolment authority (on a machine that is not the aggregating "
                                     "server) and print the public key every device pins")
    auth.add_argument("--out", required=True, help="folder for authority.key (0600) and authority.pub")
    auth.set_defaults(func=cmd_enrol_authority)
    dev = enrol_sub.add_parser("device", parents=[common], help="issue a device's certificate (and, without "
                                                                "--public-key, its signing key)")
    dev.add_argument("--authority", required=True, help="the authority's private key (DIR/authority.key)")
    dev.add_argument("--device-id", required=True, help="the device's unique id (the certificate's subject; the "
                                                        "device's node config device-id)")
    dev.add_argument("--out", required=True, help="folder for device.crt (and device.key, 0600)")
    dev.add_argument("--public-key", help="certify this Ed25519 public key (PEM, from fedrec device keygen on the "
                                          "device) instead of making a key here: the private key never leaves "
                                          "the device")
    dev.add_argument("--days", type=int, default=365, help="validity of the certificate in days (default 365)")
    dev.set_defaults(func=cmd_enrol_device)
    tls = enrol_sub.add_parser("tls", parents=[common], help="a CA and the SuperLink's server certificate and key")
    tls.add_argument("--out", required=True, help="folder for ca.crt, server.pem and server.key (0600)")
    tls.add_argument("--host", action="append", required=True,
                     help="the SuperLink's address as devices dial it, an IP address or DNS name (repeat for more); "
                          "each becomes a subject alternative name")
    tls.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    tls.set_defaults(func=cmd_enrol_tls)
    nkey = enrol_sub.add_parser("node-key", parents=[common], help="a SuperNode authentication key pair "
                                                                   "(EC P-384, OpenSSH format)")
    nkey.add_argument("--out", required=True, help="folder for NAME (private, 0600) and NAME.pub")
    nkey.add_argument("--name", required=True, help="file name of the key, e.g. the device id")
    nkey.set_defaults(func=cmd_enrol_node_key)

    device = sub.add_parser("device", help="on a device: its status, recommendations, its key")
    device_sub = device.add_subparsers(dest="device_command", required=True)
    status = device_sub.add_parser("status", parents=[common],
                                   help="the device's own privacy figures, budget left, rounds, declines and "
                                        "refusals, from its own state only")
    status.add_argument("--state-path", help="a deployed device's state folder (its node config state-path)")
    status.add_argument("--state-dir", help="or a simulation's device-state folder (RUN/device-state) ...")
    status.add_argument("--device-id", help="... and the simulated device's id (e.g. sim-3)")
    status.add_argument("--policy", help="the device's policy file (TOML of policy keys), where the state folder "
                                         "does not tell (default: its node.json's, a policy.toml beside the state, "
                                         "or a simulated run's config)")
    status.add_argument("--json", action="store_true", help="print machine-readable JSON")
    status.set_defaults(func=cmd_device_status)
    keygen = device_sub.add_parser("keygen", parents=[common],
                                   help="make the device's own signing key; send device.pub to the enrolment "
                                        "authority (fedrec enrol device --public-key)")
    keygen.add_argument("--out", required=True, help="folder for device.key (0600) and device.pub")
    keygen.set_defaults(func=cmd_device_keygen)
    dprep = device_sub.add_parser("prepare", parents=[common],
                                  help="turn this device's own raw log into its training file (its SuperNode's "
                                       "data-path), against the federation's public catalogue")
    dprep.add_argument("--dataset", default="csv", help="the log's format: csv (default, with --columns) | "
                                                        "movielens | taobao | retailrocket | counts")
    dprep.add_argument("--data-path", "--log", required=True, dest="data_path",
                       help="the device's own raw log (CSV or Parquet)")
    dprep.add_argument("--catalogue", required=True, help="the federation's public catalogue.csv (fedrec catalogue)")
    dprep.add_argument("--out", required=True, help="the training file to write, e.g. STATE_DIR/events.csv")
    dprep.add_argument("--user", help="the device's own user id in the log, where the log holds several users'")
    dprep.add_argument("--replace", action="store_true", help="write the training file again from a newer log")
    add_data_flags(dprep)
    dprep.set_defaults(func=cmd_device_prepare)
    for name, parent, help_text in (
            ("recommend", device_sub, "on a device: its top-K items from the latest item model it received (titles "
                                      "where the catalogue has them)"),
            ("recommend", sub, "moved to `fedrec device recommend` (still works)")):
        rec = parent.add_parser(name, parents=[common], help=help_text)
        rec.add_argument("--state-path", required=True, help="the device's state folder (its node config "
                                                             "state-path)")
        rec.add_argument("--catalogue", required=True, help="the public catalogue.csv of the federation")
        rec.add_argument("--data-path", help="the device's events file (default: the one its node was started with)")
        rec.add_argument("-k", type=int, default=10, help="how many items (default 10)")
        rec.set_defaults(func=cmd_recommend)

    prep = sub.add_parser("prepare", parents=[common], help="turn a raw data set into per-device partitions, a "
                                                            "catalogue and the server's folder (OUT/server)")
    prep.add_argument("--dataset", required=True, help="movielens | taobao | retailrocket | counts | csv")
    prep.add_argument("--data-path", required=True, help="file or folder of the raw data set")
    prep.add_argument("--out", required=True, help="folder to write (outside the Flower app folder): devices/<k>.csv "
                                                   "per device, catalogue.csv, server/ for the server, and the "
                                                   "simulation's arrays")
    prep.add_argument("--no-device-files", action="store_true", help="skip devices/<index>.csv (simulation only)")
    prep.add_argument("--replace", action="store_true", help="--out holds an earlier preparation: replace it whole "
                                                             "(without it, a non-empty --out is refused)")
    add_data_flags(prep)
    prep.set_defaults(func=cmd_prepare)

    cat = sub.add_parser("catalogue", parents=[common],
                         help="operator: the public catalogue and the server's folder from item metadata alone "
                              "(ids, titles, categories), without anyone's log")
    cat.add_argument("--items", required=True, help="CSV of item metadata with a header (e.g. MovieLens movies.csv)")
    cat.add_argument("--columns", required=True,
                     help="ROLE=COLUMN pairs, roles item (required), title, category: e.g. "
                          "item=movieId,title=title,category=genres")
    cat.add_argument("--separator", default=",", help="field separator of the file (default ',')")
    cat.add_argument("--encoding", default="utf-8", help="text encoding of the file (default utf-8)")
    cat.add_argument("--name", default="catalogue", help="the data set's name in the manifest (default catalogue)")
    cat.add_argument("--out", required=True, help="the server's folder to create: catalogue.csv and manifest.json")
    cat.set_defaults(func=cmd_catalogue)
    conf = sub.add_parser("config", parents=[common], help="list every run-config key and device policy key: "
                                                           "default, allowed values, help (the parsers' definitions)")
    conf.add_argument("keys", nargs="*", metavar="KEY", help="only these keys")
    conf.add_argument("--policy", action="store_true", help="only the device policy keys")
    conf.add_argument("--run-config", action="store_true", help="only the run-config keys")
    conf.add_argument("--json", action="store_true", help="print machine-readable JSON")
    conf.set_defaults(func=cmd_config)
    show_defaults(parser)
    return parser


class _DropDeprecationNotice(logging.Filter):
    """Flower marks the Python simulation API deprecated; `fedrec simulate` uses it on purpose (no SuperLink)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def configure_logging(verbose: bool) -> None:
    """Our progress goes to stderr through the 'fedrec' logger; other libraries keep their own settings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    ours = logging.getLogger("fedrec")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False
    logging.getLogger("flwr").addFilter(_DropDeprecationNotice())


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `fedrec audit --json | head` ends quietly
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except (ConfigError, DataError, StateError) as err:
        log.error("%s", err)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C; a simulation says how to resume (runner.RunInterrupted)
        log.error("%s", err or "interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `fedrec` command: simulate, prepare (and the subcommands of later modules)."""

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
    help_of = RunConfig.help_texts()
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
    from fedrec.shared.data.prepare import PrepareSettings, prepare_log
    from fedrec.shared.data.prepared import SERVER_FOLDER, refuse_inside_flower_app

    config = RunConfig.from_mapping({"dataset": args.dataset, "data-path": args.data_path, **data_overrides(args)},
                                    source="fedrec prepare")
    settings = PrepareSettings(min_user_items=config.min_user_items, min_item_users=config.min_item_users,
                               device_files=not args.no_device_files)
    out = Path(args.out)
    refuse_inside_flower_app(out, "--out")  # before reading the raw data: fail fast
    stats = prepare_log(load_dataset(config), out, dataset=args.dataset, settings=settings)
    print(f"prepared {stats['devices']} devices, {stats['items']} items, {stats['events']} events in {out}; "
          f"the server's folder (catalogue and manifest only) is {out / SERVER_FOLDER}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from fedrec.server.records import dumps

    from .api import audit

    if not args.run_dir and not args.attacks:
        raise ConfigError("fedrec audit: give a RUN_DIR to audit, --attacks, or both")
    result: dict = {}
    if args.run_dir:
        out = Path(args.out) if args.out else Path(args.run_dir) / "audit"
        result = audit(args.run_dir, tolerance=args.tolerance, out=out)
        log.info("audit %s: %d flags; wrote %s", result["verdict"], len(result["flags"]), out)
    if args.attacks:
        from .attacks import default_attack_config, run_attacks

        config = default_attack_config()
        overrides = parse_run_config(args.run_config or [])
        if overrides:
            config = RunConfig.from_mapping({**config.to_mapping(), **overrides}, source="fedrec audit --attacks")
        attacks = run_attacks(config)
        out = Path(args.out or (Path(args.run_dir) / "audit" if args.run_dir else "audit-attacks"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "attacks.json").write_text(dumps(attacks, indent=2) + "\n", encoding="utf-8")
        result = {**result, "attacks": attacks} if args.run_dir else attacks
    if args.json:
        print(dumps(result, indent=2))
    else:
        print(format_audit(result, attacks_only=not args.run_dir))
    failed = args.run_dir and result.get("verdict") == "fail"
    return 1 if failed else 0


def format_audit(result: dict, *, attacks_only: bool) -> str:
    lines = []
    if not attacks_only:
        lines.append(f"privacy audit: {result['verdict'].upper()} - {result['devices']} devices, epsilon max reported "
                     f"{result['epsilon_max_reported']:.4f}, recomputed {result['epsilon_max_recomputed']:.4f} "
                     f"(PLD {result['epsilon_max_recomputed_pld']:.4f}), largest relative difference "
                     f"{result['max_relative_diff']:.1e}, {len(result['over_budget'])} over budget, "
                     f"{len(result['flags'])} flags")
        lines += [f"  {f['severity']}: {f['message']}" for f in result["flags"][:20]]
    attacks = result if attacks_only else result.get("attacks")
    if attacks:
        inference, canary = attacks["item_inference"], attacks["canary"]
        lines.append(f"item inference AUC: {inference['dp']['auc']:.3f} with DP, {inference['no_dp']['auc']:.3f} "
                     f"without (0.5 = chance)")
        lines.append(f"canary audit: empirical epsilon lower bound {canary['epsilon_lower_bound']:.2f} with DP "
                     f"(accountant {canary['epsilon_accountant']:.2f}), {canary['no_dp']['epsilon_lower_bound']:.2f} "
                     f"without DP ({canary['correct']}/{canary['guesses']} correct guesses with DP)")
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


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_command

    return bench_command(args)


def cmd_recommend(args: argparse.Namespace) -> int:
    from fedrec.client.recommend import recommend

    picks, server_round = recommend(Path(args.state_path), Path(args.catalogue), k=args.k,
                                    data_path=Path(args.data_path) if args.data_path else None)
    print(f"top {len(picks)} for this device (item model of round {server_round}; items it already has left out)")
    for rank, pick in enumerate(picks, 1):
        print(f"{rank:>3}. {pick.label}  [item {pick.item_id}, score {pick.score:.3f}]")
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from .deploy import deploy_local
    from .runner import format_table

    mapping = parse_run_config(args.run_config or [])
    mapping.update({k: v for k, v in (("devices", args.devices), ("rounds", args.rounds),
                                      ("devices-per-round", args.devices_per_round), ("dataset", args.dataset),
                                      ("data-path", args.data_path), ("privacy", args.privacy)) if v is not None})
    if args.devices < 1 and mapping.get("dataset", "synthetic") == "synthetic":
        # one SuperNode per device: 0 means every device of a prepared folder, but a synthetic one has no 'every'
        raise ConfigError(f"--devices {args.devices}: a synthetic deployment needs at least 1")
    mapping.setdefault("devices-per-round", args.devices or RunConfig.devices_per_round)
    summary = deploy_local(RunConfig.from_mapping(mapping, source="deploy-local"), Path(args.out))
    print(format_table(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrec", description="Federated recommender with differential privacy.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", help="also show Flower's and Ray's logs")
    sub = parser.add_subparsers(dest="command", required=True)
    help_of = RunConfig.help_texts()

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
                       help="also run the empirical checks (item inference, canary membership) on a small synthetic "
                            "federation (minutes)")
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
    dep.set_defaults(func=cmd_deploy_local)

    rec = sub.add_parser("recommend", parents=[common], help="on a device: its top-K items from the latest item "
                                                             "model it received (titles where the catalogue has them)")
    rec.add_argument("--state-path", required=True, help="the device's state folder (its node config state-path)")
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
    add_data_flags(prep)
    prep.set_defaults(func=cmd_prepare)
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
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`fedrec bench`: the Flower simulation against the plain loop: round times, per-update cost, memory, bytes."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedrec.server.records import dumps
from fedrec.shared.config import SECURE_MODES, ConfigError, RunConfig

from .procs import RAY_TAGS, command_line, parents, rss_bytes, with_descendants

log = logging.getLogger("fedrec.bench")

FLOAT32 = 4  # bytes; tables and deltas travel as float32 (shared/protocol.py)
GRID_WORD = 8  # bytes; a secure sum's grid vector is int64 / uint64 (shared/distributed_dp.py)
# The default grid's axes. Only cells that vary one factor from BASE_CELL run (10 cells): the full
# product (162 cells) would take days on 2 cores, and one factor at a time shows each one's cost.
GRID_AXES = {"devices_per_round": (10, 100, 1000), "population": (1000, 10_000, 100_000),
             "items": (1000, 10_000, 100_000), "dim": (32, 64), "privacy": ("local", "none", "distributed")}
MAX_DEVICE_ENGINE_POPULATION = 10_000  # the device engine starts one Flower node per device


@dataclass(frozen=True)
class Cell:
    devices_per_round: int = 10
    population: int = 1000
    items: int = 1000
    dim: int = 32
    privacy: str = "local"  # a RunConfig privacy mode; 'none' is --no-dp

    def label(self) -> str:
        return f"N={self.devices_per_round} P={self.population} I={self.items} D={self.dim} {self.privacy}"


BASE_CELL = Cell()


def grid_cells(engine: str) -> tuple[list[Cell], dict[str, list[Cell]]]:
    """The default grid's cells to run, and the skipped ones grouped by the reason."""
    run: list[Cell] = []
    skipped: dict[str, list[Cell]] = {}
    for values in itertools.product(*GRID_AXES.values()):
        cell = Cell(*values)
        varied = sum(getattr(cell, f.name) != getattr(BASE_CELL, f.name) for f in fields(Cell))
        if varied > 1:
            skipped.setdefault("varies more than one factor from the base cell " + BASE_CELL.label(), []).append(cell)
        elif engine == "device" and cell.population > MAX_DEVICE_ENGINE_POPULATION:
            skipped.setdefault(f"device engine: one Flower node per device, over {MAX_DEVICE_ENGINE_POPULATION} "
                               "nodes do not fit 2 cores", []).append(cell)
        else:
            run.append(cell)
    return run, skipped


class PeakRss:
    """Peak summed resident memory (RSS) of this process, its descendants and Ray processes orphaned during the block.

    Sampled every `interval` seconds in a thread. Shared pages (Ray's object store, libraries) count
    once per process, so the sum is an upper bound of the memory used.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak_bytes = interval, 0
        self._before: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._before = set(parents())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / 2**30

    def _loop(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self.sample())
            if self._stop.wait(self.interval):
                return

    def sample(self) -> int:
        parent_of = parents()
        ours = with_descendants([os.getpid()], parent_of)
        ours |= {pid for pid, ppid in parent_of.items() if ppid == 1 and pid not in self._before and _is_ray(pid)}
        return sum(rss_bytes(pid) for pid in ours)


def _is_ray(pid: int) -> bool:
    return any(tag in command_line(pid) for tag in RAY_TAGS)


def cell_config(cell: Cell, *, rounds: int, engine: str, out_dir: str) -> RunConfig:
    # eval_every = rounds: no evaluation between training rounds, one small final evaluation.
    config = RunConfig().replace(dataset="synthetic", devices=cell.population, synthetic_items=cell.items,
                                 embedding_dim=cell.dim, devices_per_round=cell.devices_per_round, rounds=rounds,
                                 eval_every=rounds, eval_devices=10, final_eval_devices=20,
                                 baselines=False, out_dir=out_dir, simulation_engine=engine)
    # The secure modes sum every round under secure aggregation (modelled in the cohort engine, real in the
    # device engine); the plain loop models the sum the same way (simulation/plain.py).
    return config.without_dp() if cell.privacy == "none" else config.replace(privacy=cell.privacy)


def run_cell(cell: Cell, *, rounds: int, engine: str, verbose: bool = False) -> dict[str, Any]:
    """Plain loop first (in a process not yet grown by Flower and Ray), then Flower with the same config."""
    from fedrec.server.records import LEDGER, METRICS, RunRecords

    from .plain import node_count, run_plain
    from .runner import simulate

    with tempfile.TemporaryDirectory(prefix="fedrec-bench-") as tmp:
        config = cell_config(cell, rounds=rounds, engine=engine, out_dir=str(Path(tmp) / "run"))
        log.info("%s: plain loop, %d rounds, %s engine", cell.label(), rounds, engine)
        with PeakRss() as plain_rss:
            plain = run_plain(config.replace(out_dir="", state_dir=""), engine=engine)
        log.info("%s: Flower simulation", cell.label())
        called = time.time()
        with PeakRss() as flower_rss:
            simulate(config, verbose=verbose)
        wall = time.time() - called
        records = RunRecords(Path(config.out_dir))
        train = [e for e in records.read_jsonl(METRICS) if e.get("kind") == "train"]
        sent = next(e for e in records.read_jsonl(LEDGER)
                    if e.get("kind") == "train" and e["round"] == 1 and e.get("status") == "sent")
    # Round 1's write-ahead ledger line (wall clock) is written as its requests go out, milliseconds after the
    # round began (sampling, the plan). Startup, up to then, covers Ray's start, the nodes' registration and
    # the popularity-prior round. (It was taken from that line minus round 1's time, as if the line came after
    # the replies: short by round 1's time, and below zero where round 1 outlasted startup.)
    startup = sent["time"] - called
    flower_round = statistics.median(e["seconds"] for e in train[1:])
    plain_round = statistics.median(plain.round_seconds[1:])
    trained = statistics.mean(e["trained"] for e in train[1:])
    plain_trained = statistics.mean(plain.round_trained[1:])
    if cell.privacy in SECURE_MODES:  # the embedding (plus bias, if it trains) on the grid, 64-bit integers
        update_bytes = GRID_WORD * cell.items * (cell.dim + (1 if config.train_biases else 0))
    else:  # item-embedding delta + item-bias delta, float32
        update_bytes = FLOAT32 * cell.items * (cell.dim + 1)
    down_bytes = FLOAT32 * cell.items * (cell.dim + 1)  # the item tables a request carries
    # Cohort engine: a shard node sends one partial sum (same shape, float32) for its devices of the round,
    # so a round has at most min(nodes, devices per round) replies; the device engine one per device.
    messages = min(node_count(config, cell.population), cell.devices_per_round)
    return {**asdict(cell), "engine": engine, "rounds": rounds, "startup_s": startup,
            "first_round_s": train[0]["seconds"], "flower_round_s": flower_round, "plain_round_s": plain_round,
            "ratio": flower_round / plain_round, "flower_wall_s": wall,
            "trained_per_round": trained, "per_update_ms_flower": _per_ms(flower_round, trained),
            "per_update_ms_plain": _per_ms(plain_round, plain_trained),
            "peak_rss_gb_flower": flower_rss.peak_gb, "peak_rss_gb_plain": plain_rss.peak_gb,
            "bytes_per_update_up": update_bytes, "bytes_per_request_down": down_bytes,
            "messages_up_per_round": messages, "bytes_up_per_round": messages * update_bytes}


def _per_ms(seconds: float, count: float) -> float | None:
    return 1000 * seconds / count if count else None  # no update trained: unknown (null in JSON)


def _ms(value: float | None) -> str:
    return f"{'-':>10}" if value is None else f"{value:>10.1f}"


def run_in_child(cell: Cell, *, rounds: int, engine: str) -> dict[str, Any]:
    """One grid cell in a fresh process, so memory and Ray state do not carry over between cells."""
    argv = [sys.executable, "-m", "fedrec.simulation.cli", "bench", "--devices-per-round", str(cell.devices_per_round),
            "--population", str(cell.population), "--items", str(cell.items), "--dim", str(cell.dim),
            "--privacy", cell.privacy, "--rounds", str(rounds), "--engine", engine, "--json"]
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True)  # the child's log goes to our stderr
    if done.returncode != 0:
        log.error("%s failed (exit %d)", cell.label(), done.returncode)
        return {**asdict(cell), "engine": engine, "rounds": rounds, "error": f"exit {done.returncode}"}
    return json.loads(done.stdout)[0]


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'cell':<36}{'startup s':>10}{'round1 s':>10}{'flower s':>10}{'plain s':>10}{'ratio':>8}"
              f"{'ms/upd F':>10}{'ms/upd P':>10}{'RSS F GB':>10}{'RSS P GB':>10}{'up KB':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        label = f"{Cell(**{f.name: r[f.name] for f in fields(Cell)}).label()} {r['engine']}"
        if "error" in r:
            lines.append(f"{label:<36}  failed: {r['error']}")
            continue
        lines.append(f"{label:<36}{r['startup_s']:>10.2f}{r['first_round_s']:>10.2f}{r['flower_round_s']:>10.3f}"
                     f"{r['plain_round_s']:>10.3f}{r['ratio']:>8.2f}{_ms(r['per_update_ms_flower'])}"
                     f"{_ms(r['per_update_ms_plain'])}{r['peak_rss_gb_flower']:>10.2f}"
                     f"{r['peak_rss_gb_plain']:>10.2f}{r['bytes_per_update_up'] / 1024:>10.0f}")
    return "\n".join(lines)


def bench_command(args: argparse.Namespace) -> int:
    if args.rounds < 2:
        raise ConfigError(f"--rounds {args.rounds}: need at least 2 (round 1 is timed apart from the steady rounds)")
    if args.dp is not None and args.privacy is not None and (args.privacy == "none") == args.dp:
        raise ConfigError(f"{'--dp' if args.dp else '--no-dp'} with --privacy {args.privacy}: they disagree; "
                          "give one of them")
    if args.dp is not None and args.privacy is None:
        args.privacy = "local" if args.dp else "none"
    given = {name: getattr(args, name) for name in ("devices_per_round", "population", "items", "dim", "privacy")
             if getattr(args, name) is not None}
    if args.grid:
        if given:
            name, value = next(iter(given.items()))
            flag = f"--{name.replace('_', '-')} {value}"
            raise ConfigError(f"{flag}: --grid runs its own cells; drop one or the other")
        cells, skipped = grid_cells(args.engine)
        for reason, group in skipped.items():
            log.info("skipping %d cells (%s): %s", len(group), reason, "; ".join(c.label() for c in group))
        rows = []
        for k, cell in enumerate(cells, 1):
            log.info("cell %d/%d: %s", k, len(cells), cell.label())
            rows.append(run_in_child(cell, rounds=args.rounds, engine=args.engine))
    else:
        cell = Cell(**given)
        for flag, value, least in (("--devices-per-round", cell.devices_per_round, 1), ("--items", cell.items, 10),
                                   ("--dim", cell.dim, 1)):
            if value < least:
                raise ConfigError(f"{flag} {value}: must be at least {least}")
        if cell.population < cell.devices_per_round:
            raise ConfigError(f"--population {cell.population}: fewer devices than --devices-per-round "
                              f"{cell.devices_per_round}")
        rows = [run_cell(cell, rounds=args.rounds, engine=args.engine, verbose=args.verbose)]
    text = dumps(rows, indent=2)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench.json").write_text(text + "\n", encoding="utf-8")
    if args.json:
        print(format_table(rows), file=sys.stderr)
        print(text)
    else:
        print(format_table(rows))
    return 1 if any("error" in r for r in rows) else 0

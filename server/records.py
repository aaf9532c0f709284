"""The run directory: config, append-only metrics and privacy ledger, checkpoint, summary."""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared.config import ConfigError, RunConfig
from fedrec.shared.head import NoisyPrior
from fedrec.shared.model import ItemTables
from fedrec.shared.provenance import versions
from fedrec.shared.state import atomic_write

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LEDGER = "ledger.jsonl"
CHECKPOINT = "checkpoint.npz"
SUMMARY = "summary.json"
# Settings that may differ when a run is resumed (everything else must match the original).
RESUMABLE_CHANGES = {"rounds", "round-timeout", "node-wait-timeout", "out-dir", "final-eval-devices", "resume"}


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float as None: JSON has neither, and strict parsers (jq, most languages)
    reject the NaN/Infinity Python writes by default. Numpy scalars and arrays become plain Python values.

    Sources that know why a value is missing (an infinite epsilon: a release without DP) say so next to it;
    this is the last guard, so a file is always valid JSON.
    """
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, **options: Any) -> str:
    """Strict JSON text of `value` (see json_safe); every JSON file fedrec writes goes through here."""
    return json.dumps(json_safe(value), allow_nan=False, **options)


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


@dataclass
class Checkpoint:
    server_round: int
    tables: ItemTables
    optimizer_state: dict[str, np.ndarray]
    noise_multiplier: float
    noise_variance: float  # known DP noise per embedding coordinate (nan if unknown)
    prior: NoisyPrior | None = None  # the released popularity sum, from which the head was chosen
    head: np.ndarray | None = None  # the item ids that train (shared/head.py); None: all of them


class RunRecords:
    """Everything the server writes about a run, under one directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._ledger_started = False  # whether this server process has written a ledger line yet

    @classmethod
    def open(cls, config: RunConfig, *, resume: bool) -> RunRecords:
        """Create a new run directory, or reopen one to resume (its config must match)."""
        records = cls(Path(config.out_dir) if config.out_dir else default_run_dir())
        stored = records.path / CONFIG
        if stored.exists():
            if not resume:
                raise ConfigError(f"{records.path} already holds a run; resume it or choose another out-dir")
            previous = RunConfig.load_json(stored).to_mapping()
            changed = {k for k, v in config.to_mapping().items() if previous.get(k) != v} - RESUMABLE_CHANGES
            if changed:
                raise ConfigError(f"{stored}: cannot resume with different settings for {sorted(changed)}")
        records.path.mkdir(parents=True, exist_ok=True)
        atomic_write(stored, (dumps(config.to_mapping(), indent=2, sort_keys=True) + "\n").encode())
        return records

    def append(self, name: str, record: dict[str, Any]) -> None:
        """Append one JSON line and fsync it, so a crash loses at most the line being written.

        The first ledger line a server process writes (a new run's first, a resumed run's first after the resume)
        carries the versions of the code it ran with ('provenance'), so the audit can say what each part ran on.
        """
        if name == LEDGER and not self._ledger_started:
            record = {**record, "provenance": versions()}
            self._ledger_started = True
        with open(self.path / name, "a", encoding="utf-8") as fh:
            fh.write(dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        path = self.path / name
        if not path.exists():
            return []
        lines = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a crash ends the readable record
        return lines

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, server_round=checkpoint.server_round, embedding=checkpoint.tables.embedding,
                 bias=checkpoint.tables.bias, noise_multiplier=checkpoint.noise_multiplier,
                 noise_variance=checkpoint.noise_variance,
                 **({"prior_counts": checkpoint.prior.counts, "prior_noise_std": checkpoint.prior.noise_std,
                     "prior_reports": checkpoint.prior.reports} if checkpoint.prior is not None else {}),
                 **({"head": checkpoint.head} if checkpoint.head is not None else {}),
                 **{f"opt.{k}": v for k, v in checkpoint.optimizer_state.items()})
        atomic_write(self.path / CHECKPOINT, buffer.getvalue())

    def load_checkpoint(self) -> Checkpoint | None:
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        try:
            with np.load(path) as data:
                return Checkpoint(server_round=int(data["server_round"]),
                                  tables=ItemTables(embedding=data["embedding"], bias=data["bias"]),
                                  optimizer_state={k[4:]: data[k] for k in data.files if k.startswith("opt.")},
                                  noise_multiplier=float(data["noise_multiplier"]),
                                  noise_variance=float(data["noise_variance"]),
                                  prior=NoisyPrior(data["prior_counts"].astype(np.float64),
                                                   noise_std=float(data["prior_noise_std"]),
                                                   reports=int(data["prior_reports"]))
                                  if "prior_counts" in data.files else None,
                                  head=data["head"].astype(np.int64) if "head" in data.files else None)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{path}: unreadable checkpoint ({err})") from None

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json, with the versions of fedrec and its privacy-relevant dependencies ('provenance')."""
        summary = {**summary, "provenance": versions()}
        atomic_write(self.path / SUMMARY, (dumps(summary, indent=2, sort_keys=False) + "\n").encode())

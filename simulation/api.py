"""Python entry points for notebooks - simulate, report, audit - on which the `fedrec` command is built."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrec.shared.config import ConfigError, RunConfig

if TYPE_CHECKING:  # pandas is imported when a result is read, so `import fedrec.simulation` stays light
    import pandas as pd

__all__ = ["Report", "Result", "audit", "load", "report", "run_config", "simulate"]


@dataclass(frozen=True, eq=False)  # a DataFrame has no single truth value to compare by
class Result:
    """A finished simulation, as its run directory holds it.

    summary: summary.json (metrics, baselines, privacy spent; unknown values are None).
    metrics: metrics.jsonl, one row per training round and per evaluation (column `kind`).
    run_dir: the run directory (config, ledger, checkpoint; `fedrec audit` and `fedrec simulate --resume` read it).
    data_set_devices: devices in the real data set (the run may use a subset); None for synthetic data.
    """

    summary: dict[str, Any]
    metrics: pd.DataFrame
    run_dir: Path
    data_set_devices: int | None = None

    @property
    def config(self) -> RunConfig:
        """The settings the run used (config.json; real data appears as its prepared folder)."""
        return RunConfig.load_json(self.run_dir / "config.json")

    def table(self) -> str:
        """The table `fedrec simulate` prints: the model against the baselines, and the privacy spent."""
        from .learning_curve import last_central_evaluation
        from .runner import format_table

        return format_table(self.summary, available=self.data_set_devices,
                            central=last_central_evaluation(self.metrics))


@dataclass(frozen=True, eq=False)
class Report:
    """A privacy-utility report (`fedrec report`): one row per model, the files written to out_dir."""

    rows: pd.DataFrame
    meta: dict[str, Any]
    out_dir: Path

    @property
    def markdown(self) -> str:
        return (self.out_dir / "report.md").read_text(encoding="utf-8")


def run_config(config: RunConfig | Mapping[str, Any] | None = None, *, no_dp: bool = False,
               **settings: Any) -> RunConfig:
    """A checked RunConfig: `config` (a RunConfig, or a mapping with keys as in pyproject.toml) with `settings`.

    Keys may be kebab-case (`devices-per-round`) or snake_case (`devices_per_round`). `no_dp=True` is
    `fedrec simulate --no-dp`: no DP in the plans, and the simulated devices' policy allows it (dp=False alone
    leaves their policy as it is, so they refuse). With resume=True and no full RunConfig, the settings stored
    in out-dir are the base, as for `fedrec simulate --resume --out DIR`.
    """
    given = config.to_mapping() if isinstance(config, RunConfig) else dict(config or {})
    mapping = {_kebab(k): v for k, v in {**given, **settings}.items()}
    resume = "resume" in mapping and RunConfig.from_mapping({"resume": mapping["resume"]}).resume
    if resume and not isinstance(config, RunConfig):
        if not mapping.get("out-dir"):
            raise ConfigError("resume needs out-dir, the run directory to continue")
        mapping = {**RunConfig.load_json(Path(mapping["out-dir"]) / "config.json").to_mapping(), **mapping}
    checked = RunConfig.from_mapping(mapping, source="run config")
    return checked.without_dp() if no_dp and not resume else checked  # a resumed run keeps its stored policy


def simulate(config: RunConfig | Mapping[str, Any] | None = None, *, no_dp: bool = False, verbose: bool = False,
             **settings: Any) -> Result:
    """Run a federated simulation (the Flower app in its simulation engine) and return its Result.

    `config` and `settings` as for run_config, e.g. ``simulate(rounds=20, devices=200)`` or
    ``simulate(dataset="movielens", data_path="ml-100k")`` (a real data set uses all its devices unless
    `devices` says how many). `verbose` also shows Flower's and Ray's logs. An empty out-dir is runs/<timestamp>;
    the run's log is also kept there (fedrec.log). Ctrl-C (in the main thread) stops the run before its next round
    and raises runner.RunInterrupted, a KeyboardInterrupt that says how to resume; a second Ctrl-C stops at once.
    """
    from .runner import simulate as run_simulation

    summary = run_simulation(run_config(config, no_dp=no_dp, **settings), verbose=verbose)
    return load(summary["run_dir"])


def load(run_dir: str | Path) -> Result:
    """The Result of a finished run directory (written by simulate, `fedrec simulate` or `flwr run`)."""
    import pandas as pd

    from fedrec.server.records import METRICS, SUMMARY, RunRecords

    from .runner import data_set_devices

    records = RunRecords(Path(run_dir))
    summary = json.loads((records.path / SUMMARY).read_text(encoding="utf-8"))
    stored = records.path / "config.json"
    available = data_set_devices(RunConfig.load_json(stored)) if stored.exists() else None
    return Result(summary=summary, metrics=pd.DataFrame.from_records(records.read_jsonl(METRICS)),
                  run_dir=records.path, data_set_devices=available)


def report(config: RunConfig | Mapping[str, Any] | None = None, *, out: str | Path,
           epsilons: Iterable[float] = (1.0, 2.0, 4.0, 8.0), title: str = "", modes: Iterable[str] | None = None,
           **settings: Any) -> Report:
    """Privacy-utility report on one split: baselines, central DP-SGD and federated runs with and without DP
    at each per-device epsilon (a row group per privacy mode in `modes`, e.g. ("local", "distributed")); writes
    report.md/csv/json/png to `out` (`fedrec report`)."""
    import pandas as pd

    from .privacy_utility import make_report

    paths = make_report(run_config(config, **settings), epsilons=[float(e) for e in epsilons], out=Path(out),
                        title=title, modes=list(modes) if modes is not None else None)
    written = json.loads(paths[2].read_text(encoding="utf-8"))
    rows = pd.DataFrame.from_records([{**{k: v for k, v in row.items() if k != "metrics"}, **row["metrics"]}
                                      for row in written["rows"]])
    return Report(rows=rows, meta=written["meta"], out_dir=Path(out))


def audit(run_dir: str | Path, *, tolerance: float = 1e-3, out: str | Path | None = None) -> dict[str, Any]:
    """Recompute and check a run's privacy claims from its ledger and config (`fedrec audit RUN_DIR`).

    Writes audit.json/md, devices.csv and plots to `out` (default RUN_DIR/audit); returns the verdict
    (key `verdict`: pass | fail, `flags`, per-device epsilons, ...).
    """
    from fedrec.server.audit import audit_run
    from fedrec.server.audit_report import write_audit

    result = audit_run(Path(run_dir), tolerance=tolerance)
    write_audit(result, Path(out) if out else Path(run_dir) / "audit")
    return result


def _kebab(key: str) -> str:
    return key.replace("_", "-")

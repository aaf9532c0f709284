"""`fedrec scale`: what population a privacy budget needs - HR@10 against the number of devices, per mode and epsilon.

User-level and secure-sum DP are population effects: the noise of a sum is fixed by the budget, the signal grows
with the devices in it, and in the secure modes a device is charged only for the rounds it joins. So the same
catalogue and budget are run on synthetic populations of growing size, each with the default cohort and with a
cohort that is a fixed share of the population. Every point is a run of the plain loop (the same model as `fedrec
simulate` with the cohort engine, tests/test_simulation_e2e.py), evaluated as a run's summary evaluates it. Points
are appended to scale.csv as they finish, so an interrupted grid resumes where it stopped with the same command.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedrec.server.core import secure_threshold  # noqa: E402
from fedrec.server.records import dumps  # noqa: E402
from fedrec.shared.baselines import popularity_metrics  # noqa: E402
from fedrec.shared.config import SECURE_MODES, ConfigError, RunConfig  # noqa: E402
from fedrec.shared.data.population import DeviceSplit, Population, open_population, population_splits  # noqa: E402
from fedrec.shared.policy import DEFAULT_MAX_AGGREGATION_THRESHOLD  # noqa: E402
from fedrec.shared.ranking import evaluate_with_refit  # noqa: E402

from .plain import run_plain  # noqa: E402

log = logging.getLogger("fedrec.simulation")
DEFAULT_COHORT = "default"
MODES = ("user", "distributed", "local", "none")
FIELDS = ("devices", "cohort", "devices_per_round", "mode", "epsilon", "rounds", "seed", "hr@10", "coverage@10",
          "popularity_hr@10", "epsilon_max", "noise_multiplier", "trained_per_round", "seconds")
KEY_FIELDS = ("devices", "cohort", "mode", "epsilon", "rounds", "seed")
SETTINGS_FILE = "scale-config.json"
PER_POINT = {"devices", "privacy", "dp", "epsilon-budget", "rounds", "seed"}  # set by each point, or columns of it


@dataclass(frozen=True)
class ScaleGrid:
    """The points to run: every population x cohort x mode x epsilon (no epsilon for mode 'none')."""

    populations: tuple[int, ...]
    cohorts: tuple[str, ...]  # 'default' (the config's devices-per-round) or a share of the population, e.g. '0.1'
    modes: tuple[str, ...]
    epsilons: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.populations or min(self.populations) < 2:
            raise ConfigError(f"--populations {list(self.populations)}: expected sizes of at least 2 devices")
        for cohort in self.cohorts:
            if cohort != DEFAULT_COHORT and not 0 < _share(cohort) <= 1:
                raise ConfigError(f"--cohorts: '{cohort}' is neither 'default' nor a share in (0, 1]")
        unknown = sorted(set(self.modes) - set(MODES))
        if unknown or not self.modes:
            raise ConfigError(f"--modes: {unknown or 'none given'}; expected some of {', '.join(MODES)}")
        if any(e <= 0 for e in self.epsilons) or (not self.epsilons and set(self.modes) != {"none"}):
            raise ConfigError(f"--epsilons {list(self.epsilons)}: expected positive per-device budgets")

    def points(self) -> list[tuple[int, str, str, float | None]]:
        """In the order they run: cohort by cohort (the default, the cheapest, first), then population by
        population."""
        return [(n, cohort, mode, eps) for cohort in self.cohorts for n in self.populations for mode in self.modes
                for eps in ((None,) if mode == "none" else self.epsilons)]


def _share(cohort: str) -> float:
    try:
        return float(cohort)
    except ValueError:
        return -1.0


def cohort_size(cohort: str, population: int, default: int) -> int:
    """Devices per round for a cohort setting: the config's own, or the share of the population (at least 1)."""
    if cohort == DEFAULT_COHORT:
        return min(default, population)
    return max(1, min(population, round(_share(cohort) * population)))


def point_config(base: RunConfig, devices: int, cohort: str, mode: str, epsilon: float | None) -> RunConfig:
    """One point's run config. A secure-sum cohort whose t exceeds what a device accepts by default
    (max-aggregation-threshold, set for the cost of Shamir sharing, which grows with t^2) raises that cap in the
    simulated devices' policy, so that a large cohort is one sum, as the figure assumes."""
    config = base.replace(devices=devices, devices_per_round=cohort_size(cohort, devices, base.devices_per_round))
    if mode == "none":
        return config.without_dp()
    config = config.replace(privacy=mode, dp=True, epsilon_budget=float(epsilon))
    if mode in SECURE_MODES:
        t = secure_threshold(config, {0: [""] * config.devices_per_round})[0]
        if t > DEFAULT_MAX_AGGREGATION_THRESHOLD:
            config = config.replace(device_policy=f"{config.device_policy} max-aggregation-threshold={t}".strip())
    return config


def _key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(_normal(row[k]) for k in KEY_FIELDS)


def _normal(value: Any) -> str:
    if value in (None, ""):
        return ""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def run_scale(base: RunConfig, grid: ScaleGrid, *, out: Path,
              publish: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Run every point of `grid` not yet in out/scale.csv, appending each as it finishes and handing all rows to
    `publish` after each (so an interrupted grid leaves its files up to date); returns all rows. A point whose cohort
    is another point's (a share equal to the default cohort) copies that point's run."""
    if base.dataset != "synthetic":
        raise ConfigError(f"fedrec scale: dataset '{base.dataset}': only synthetic populations can grow with one "
                          "catalogue (the catalogue depends on the seed and synthetic-items alone)")
    out.mkdir(parents=True, exist_ok=True)
    check_settings(base, out)
    table = out / "scale.csv"
    rows = read_rows(table)
    done = {_key(r) for r in rows}
    todo = [p for p in grid.points()
            if _key({"devices": p[0], "cohort": p[1], "mode": p[2], "epsilon": p[3], "rounds": base.rounds,
                     "seed": base.seed}) not in done]
    log.info("scale: %d points, %d done already in %s", len(grid.points()), len(grid.points()) - len(todo), table)
    new_file = not table.exists()
    with open(table, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        population, splits, popular = None, [], 0.0
        for devices, cohort, mode, eps in todo:
            if population is None or population.num_devices != devices:
                population = open_population(base.replace(devices=devices))
                splits = population_splits(population)
                popular = popularity_metrics(splits, population.num_items, seed=base.seed)["hr@10"]
            config = point_config(base, devices, cohort, mode, eps)
            same = [r for r in rows if _run_key(r) == _run_key({"devices": devices, "mode": mode, "epsilon": eps,
                                                                "devices_per_round": config.devices_per_round,
                                                                "rounds": config.rounds, "seed": config.seed})]
            row = {**same[0], "cohort": cohort} if same else _run_point(config, cohort, eps, population, splits,
                                                                          popular)
            writer.writerow(row)
            fh.flush()
            rows.append({k: str(v) for k, v in row.items()})
            log.info("scale [%d/%d] %d devices, cohort %s (%d a round), %s, epsilon %s: HR@10 %.4f (popularity "
                     "%.4f), %s", len(rows) - len(done), len(todo), devices, cohort, config.devices_per_round, mode,
                     "-" if eps is None else f"{eps:g}", float(row["hr@10"]), popular,
                     "the same run as another cohort's" if same else f"{float(row['seconds']):.0f} s")
            if publish is not None:
                publish(rows)
    return rows


def check_settings(base: RunConfig, out: Path) -> None:
    """A grid's folder holds the points of one set of settings (all but those a point sets, and rounds and seed,
    which are columns of its rows): record them on first use, refuse other ones later."""
    settings = {k: v for k, v in base.to_mapping().items() if k not in PER_POINT}
    path = out / SETTINGS_FILE
    if not path.exists():
        path.write_text(dumps(settings, indent=2) + "\n", encoding="utf-8")
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not readable ({err}); use another --out") from None
    changed = [f"{k}: {earlier.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(earlier) | set(settings))
               if json.loads(dumps(earlier.get(k))) != json.loads(dumps(settings.get(k)))]
    if changed:
        raise ConfigError(f"{out} holds a grid with other settings ({'; '.join(changed)}); use another --out")


def _run_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(_normal(row[k]) for k in ("devices", "devices_per_round", "mode", "epsilon", "rounds", "seed"))


def _run_point(config: RunConfig, cohort: str, eps: float | None, population: Population,
               splits: list[DeviceSplit], popular: float) -> dict[str, Any]:
    started = time.perf_counter()
    result = run_plain(config, engine="cohort", population=population)
    metrics = evaluate_with_refit(result.tables, splits, population.num_items, l2=config.refit_l2, sampled_seed=None)
    return {"devices": population.num_devices, "cohort": cohort, "devices_per_round": config.devices_per_round,
            "mode": config.privacy, "epsilon": "" if eps is None else eps, "rounds": config.rounds,
            "seed": config.seed, "hr@10": round(metrics["hr@10"], 5), "coverage@10": round(metrics["coverage@10"], 5),
            "popularity_hr@10": round(popular, 5),
            "epsilon_max": round(max(result.epsilon.values()), 4) if config.dp and result.epsilon else "",
            "noise_multiplier": round(result.noise_multiplier, 4),
            "trained_per_round": round(float(np.mean(result.round_trained)), 1),
            "seconds": round(time.perf_counter() - started, 1)}


def write_scale(rows: Sequence[Mapping[str, Any]], out: Path, *, meta: Mapping[str, Any]) -> list[Path]:
    """scale.md (a table per mode), scale.json and scale.png (HR@10 against devices, a panel per mode)."""
    paths = [out / "scale.md", out / "scale.json", out / "scale.png"]
    paths[1].write_text(dumps({"meta": dict(meta), "rows": [dict(r) for r in rows]}, indent=2) + "\n",
                        encoding="utf-8")
    _plot(rows, paths[2], meta)
    lines = [f"# HR@10 against the number of devices ({meta['items']} items, {meta['rounds']} rounds, seed "
             f"{meta['seed']})", "",
             "Synthetic populations with one catalogue; epsilon per device (record level in local and distributed "
             "mode, user level in user mode), delta " f"{meta['delta']:g}. Cohort 'default': "
             f"{meta['devices_per_round']} devices a round; a share: that part of the population each round.", ""]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        lines += [f"## {mode}", "", "| devices | cohort (a round) | epsilon | HR@10 | popularity | coverage@10 | "
                  "epsilon max | sigma | seconds |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["mode"] == mode),
                        key=lambda r: (int(r["devices"]), _share(str(r["cohort"])), float(r["epsilon"] or 0))):
            lines.append(f"| {r['devices']} | {r['cohort']} ({r['devices_per_round']}) | {r['epsilon'] or '-'} | "
                         f"{float(r['hr@10']):.4f} | {float(r['popularity_hr@10']):.4f} | "
                         f"{float(r['coverage@10']):.3f} | {r['epsilon_max'] or '-'} | {r['noise_multiplier']} | "
                         f"{float(r['seconds']):.0f} |")
        lines.append("")
    lines.append("![HR@10 against devices](scale.png)")
    paths[0].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def _plot(rows: Sequence[Mapping[str, Any]], path: Path, meta: Mapping[str, Any]) -> None:
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    dp_modes = [m for m in modes if m != "none"] or modes
    fig, axes = plt.subplots(1, len(dp_modes), figsize=(4.4 * len(dp_modes), 4.2), sharey=True, squeeze=False)
    epsilons = sorted({float(r["epsilon"]) for r in rows if r["epsilon"] not in ("", None)})
    colours = dict(zip(epsilons, plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(1, len(epsilons))))))
    cohorts = list(dict.fromkeys(str(r["cohort"]) for r in rows))
    styles = dict(zip(cohorts, ("-", "--", ":", "-.")))
    populations = sorted({int(r["devices"]) for r in rows})

    def line(ax: Any, subset: Iterable[Mapping[str, Any]], **style: Any) -> None:
        points = sorted((int(r["devices"]), float(r["hr@10"])) for r in subset)
        if points:
            ax.plot(*zip(*points), marker="o", markersize=4, **style)

    for ax, mode in zip(axes[0], dp_modes):
        for cohort in cohorts:
            for eps in epsilons:
                line(ax, [r for r in rows if r["mode"] == mode and str(r["cohort"]) == cohort
                          and r["epsilon"] not in ("", None) and float(r["epsilon"]) == eps],
                     color=colours[eps], linestyle=styles[cohort], label=f"epsilon {eps:g}, cohort {cohort}")
            line(ax, [r for r in rows if r["mode"] == "none" and str(r["cohort"]) == cohort], color="#4477aa",
                 linestyle=styles[cohort], label=f"no DP, cohort {cohort}")
        popular = {int(r["devices"]): float(r["popularity_hr@10"]) for r in rows}
        ax.plot(sorted(popular), [popular[n] for n in sorted(popular)], color="#777777", linestyle=":", marker="x",
                label="popularity")
        ax.set_xscale("log")
        ax.set_xticks(populations, [f"{n:,}" for n in populations])
        ax.minorticks_off()
        ax.set(title=f"{mode} ({'user' if mode == 'user' else 'record'} level)" if mode != "none" else "no DP",
               xlabel="devices in the population")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("HR@10 (full ranking)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"HR@10 against population: {meta['items']} items, {meta['rounds']} rounds; cohort 'default' = "
                 f"{meta['devices_per_round']} devices a round", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_scale(base: RunConfig, grid: ScaleGrid, *, out: Path) -> list[Path]:
    """Run the grid (run_scale) and write scale.md/json/png for its points, after each point and at the end."""
    meta = {"items": base.synthetic_items, "rounds": base.rounds, "seed": base.seed, "delta": base.delta,
            "devices_per_round": base.devices_per_round, "populations": list(grid.populations),
            "cohorts": list(grid.cohorts), "modes": list(grid.modes), "epsilons": list(grid.epsilons)}
    wanted = {_key({"devices": n, "cohort": c, "mode": m, "epsilon": e, "rounds": base.rounds, "seed": base.seed})
              for n, c, m, e in grid.points()}

    def publish(rows: list[dict[str, Any]]) -> list[Path]:
        return write_scale([r for r in rows if _key(r) in wanted], Path(out), meta=meta)

    return publish(run_scale(base, grid, out=Path(out), publish=publish))

"""`fedrec report`: what privacy costs on your data - every model on the same split, one table and one plot.

Rows: random, popularity, central MF (non-private), central DP-SGD MF at each epsilon (record
level, the same unit as the devices'), federated without DP, and federated with DP at each
epsilon per device. Federated rows run the same server core and device code as the Flower app
(the plain loop, tested equal to it); every model ranks with the devices' own re-fit rows,
except the non-private central MF, which keeps the user rows it learned.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedrec.server.records import dumps  # noqa: E402
from fedrec.shared.baselines import (  # noqa: E402
    CentralDP,
    CentralMFSettings,
    popularity_metrics,
    random_metrics,
    train_central_mf,
)
from fedrec.shared.config import RunConfig  # noqa: E402
from fedrec.shared.data.population import open_population, population_splits  # noqa: E402
from fedrec.shared.evaluation import CategoryDiversity, evaluate_population  # noqa: E402
from fedrec.shared.ranking import evaluate_with_refit  # noqa: E402

from .plain import run_plain  # noqa: E402
from .runner import data_set_devices, prepare_run_data  # noqa: E402

log = logging.getLogger("fedrec.simulation")
COLUMNS = ("hr@10", "ndcg@10", "recall@20", "coverage@10", "diversity@10")
MODE_NOTES = {
    "local": "every device adds the full noise; trusts no one",
    "distributed": "record level, noise added once to a secure sum: holds against a malicious server that colludes "
                   "with at most c devices but cannot enrol identities",
    "user": "user level on the same secure sums; epsilon per device, not per interaction",
}
Z95 = 1.959964


@dataclass
class Row:
    model: str
    kind: str  # baseline | central-dp | federated | federated-dp
    epsilon_target: float | None = None
    epsilon_max: float | None = None
    epsilon_median: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    mode: str = ""  # federated + DP rows: the privacy mode (local | distributed | user)


def run_report(config: RunConfig, *, epsilons: list[float], out: Path, modes: list[str] | None = None) -> list[Row]:
    """Every row on one split; `modes`: a row group of federated + DP runs per privacy mode (default: the
    config's own mode, 'local' when it has none)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = prepare_run_data(config, out)
    population = open_population(config)
    catalogue = population.catalogue()
    splits = population_splits(population)
    n = population.num_items
    diversity = CategoryDiversity(catalogue.categories) if catalogue.categories else None
    log.info("report on %d devices, %d items; epsilons %s", len(splits), n, epsilons)
    rows: list[Row] = []

    def timed(row: Row, compute: Any) -> None:
        started = time.perf_counter()
        row.metrics = {k: v for k, v in compute().items() if k in COLUMNS}
        row.seconds = round(time.perf_counter() - started, 1)
        rows.append(row)
        log.info("%-34s HR@10 %.4f NDCG@10 %.4f (%.0fs)", row.model, row.metrics["hr@10"], row.metrics["ndcg@10"],
                 row.seconds)

    timed(Row("random", "baseline"), lambda: random_metrics(splits, n, seed=config.seed, diversity=diversity))
    timed(Row("popularity", "baseline"), lambda: popularity_metrics(splits, n, seed=config.seed, diversity=diversity))
    mf = CentralMFSettings(dim=config.embedding_dim)

    def central(dp: CentralDP | None) -> dict[str, float]:
        rows_, tables, _ = train_central_mf(splits, n, mf, seed=config.seed, dp=dp)
        if dp is None:
            return evaluate_population(lambda idx: tables.scores(rows_[idx]), splits, n, sampled_seed=None,
                                       diversity=diversity)
        return evaluate_with_refit(tables, splits, n, l2=config.refit_l2, sampled_seed=None, diversity=diversity)

    timed(Row("central MF (no DP)", "baseline"), lambda: central(None))
    for eps in epsilons:
        timed(Row(f"central DP-SGD MF, eps {eps:g}", "central-dp", epsilon_target=eps, epsilon_max=eps),
              lambda eps=eps: central(CentralDP(epsilon=eps, delta=config.delta)))
    modes = modes or [config.privacy if config.privacy != "none" else "local"]
    runs = [(None, "", config.without_dp())] + [(eps, mode, config.replace(privacy=mode, epsilon_budget=eps))
                                                for mode in modes for eps in epsilons]
    for eps, mode, run_config in runs:
        label = f"federated + DP ({mode})" if len(modes) > 1 or mode != "local" else "federated + DP"
        row = Row("federated (no DP)" if eps is None else f"{label}, eps {eps:g}",
                  "federated" if eps is None else "federated-dp", epsilon_target=eps, mode=mode)

        def federated(run_config: RunConfig = run_config, row: Row = row) -> dict[str, float]:
            result = run_plain(run_config, engine="device", population=population)
            if run_config.dp:
                values = sorted(result.epsilon.values())
                row.epsilon_max, row.epsilon_median = values[-1], float(np.median(values))
            return evaluate_with_refit(result.tables, splits, n, l2=run_config.refit_l2, sampled_seed=None,
                                       diversity=diversity)

        timed(row, federated)
    return rows


def make_report(config: RunConfig, *, epsilons: list[float], out: Path, title: str = "",
                modes: list[str] | None = None) -> list[Path]:
    """Run every row (run_report) and write report.md/csv/json/png under `out`; returns their paths."""
    started = time.perf_counter()
    rows = run_report(config, epsilons=epsilons, out=out, modes=modes)
    prepared = prepare_run_data(config, Path(out))  # already prepared by run_report: only names the folder
    population = open_population(prepared)
    meta = {"dataset": config.dataset, "data_path": config.data_path, "devices": population.num_devices,
            "devices_available": data_set_devices(prepared), "items": population.num_items, "rounds": config.rounds,
            "devices_per_round": config.devices_per_round, "delta": config.delta, "epsilons": epsilons,
            "seconds": time.perf_counter() - started}
    return write_report(rows, Path(out), title=title or config.dataset, meta=meta)


def write_report(rows: list[Row], out: Path, *, title: str, meta: dict[str, Any]) -> list[Path]:
    out = Path(out)
    paths = [out / "report.md", out / "report.csv", out / "report.json", out / "report.png"]
    columns = [c for c in COLUMNS if any(c in r.metrics for r in rows)]
    with open(paths[1], "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "kind", "mode", "epsilon_target", "epsilon_max", "epsilon_median", *columns,
                         "seconds"])
        for r in rows:
            writer.writerow([r.model, r.kind, r.mode, r.epsilon_target, r.epsilon_max, r.epsilon_median,
                             *[r.metrics.get(c) for c in columns], r.seconds])
    paths[2].write_text(dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n", encoding="utf-8")
    _plot(rows, paths[3], title, meta)
    lines = [f"# Privacy-utility report: {title}", "",
             f"{_devices(meta)}, {meta['items']} items, {meta['rounds']} rounds of "
             f"{meta['devices_per_round']} devices; delta {meta['delta']:g}; full ranking, leave-last-out; "
             f"{meta['seconds']:.0f} s in all.", "",
             "| model | epsilon (max / median per device) | " + " | ".join(columns) + " | time |",
             "|---|---|" + "---|" * len(columns) + "---|"]
    for r in rows:
        eps = "-" if r.epsilon_max is None else (f"{r.epsilon_max:.2f}" if r.epsilon_median is None else
                                                  f"{r.epsilon_max:.2f} / {r.epsilon_median:.2f}")
        values = " | ".join(f"{r.metrics[c]:.4f}" if c in r.metrics else "-" for c in columns)
        lines.append(f"| {r.model} | {eps} | {values} | {r.seconds:.0f} s |")
    ran = list(dict.fromkeys(r.mode for r in rows if r.kind == "federated-dp"))
    if ran:
        lines += ["", "Federated + DP " + ("modes: " if len(ran) > 1 else "mode: ")
                  + "; ".join(f"{mode} ({MODE_NOTES[mode]})" for mode in ran if mode in MODE_NOTES) + "."]
    lines += ["", f"Plot: bands and bars are 95% intervals over the {meta['devices']} test users (Wilson for HR@10, "
              "whose per-user value is 0 or 1 except at ties; for NDCG@10, a normal interval with the largest "
              "variance a mean of values in [0, 1] can have), the sampling error of the test set alone, not of "
              "training.",
              "", "Central DP-SGD rows: record-level DP over the pooled data (one interaction = one record, the "
              "devices' unit); a trusted curator would be needed to run them. Diversity: mean pairwise "
              "category distance (1 - Jaccard) within each top-10 list.", "",
              "![HR and NDCG against epsilon](report.png)"]
    paths[0].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def _devices(meta: dict[str, Any]) -> str:
    available = meta.get("devices_available")
    return f"{meta['devices']} devices" if available is None else f"{meta['devices']} of {available} devices"


def interval(mean: float, n: int, metric: str) -> tuple[float, float]:
    """95% interval of a mean over `n` test users: Wilson's for HR@10 (each user 0 or 1); for other metrics in
    [0, 1] the normal interval with the largest variance such a mean allows, m (1 - m) / n (conservative)."""
    if n <= 0:
        return mean, mean
    if metric == "hr@10":
        centre = (mean + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
        half = Z95 / (1 + Z95**2 / n) * np.sqrt(mean * (1 - mean) / n + Z95**2 / (4 * n**2))
        return max(0.0, centre - half), min(1.0, centre + half)
    half = Z95 * np.sqrt(max(mean * (1 - mean), 0.0) / n)
    return max(0.0, mean - half), min(1.0, mean + half)


def _plot(rows: list[Row], path: Path, title: str, meta: dict[str, Any]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    users = int(meta["devices"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    baselines = {"popularity": ("#777777", ":"), "random": ("#bbbbbb", ":"), "central MF (no DP)": ("#228833", "--"),
                 "federated (no DP)": ("#4477aa", "--")}
    colors = {"local": "#4477aa", "distributed": "#ee6677", "user": "#aa3377"}
    groups = [("federated-dp", mode, colors.get(mode, "#4477aa"), f"federated + DP ({mode})")
              for mode in dict.fromkeys(r.mode for r in rows if r.kind == "federated-dp")]
    groups.append(("central-dp", "", "#228833", "central DP-SGD"))
    groups = [g for g in groups if any(r.kind == g[0] and r.mode == g[1] for r in rows)]
    markers = ("o", "s", "^", "D")
    epsilons = sorted({r.epsilon_target for r in rows if r.epsilon_target is not None})
    for ax, metric in zip(axes, ("hr@10", "ndcg@10")):
        for i, (kind, mode, color, label) in enumerate(groups):
            points = sorted((r.epsilon_target, r.metrics[metric]) for r in rows
                            if r.kind == kind and r.mode == mode and metric in r.metrics)
            if not points:
                continue
            # Each group a little apart on the (log) epsilon axis, so equal values do not hide each other.
            shift = 2 ** (0.08 * (i - (len(groups) - 1) / 2))
            x = [e * shift for e, _ in points]
            y = [v for _, v in points]
            low, high = zip(*(interval(v, users, metric) for v in y))
            ax.errorbar(x, y, yerr=[np.subtract(y, low), np.subtract(high, y)], marker=markers[i % len(markers)],
                        color=color, label=label, capsize=3, linewidth=1.5, markersize=5)
        for r in rows:
            if r.model in baselines and metric in r.metrics:
                color, style = baselines[r.model]
                low, high = interval(r.metrics[metric], users, metric)
                ax.axhline(r.metrics[metric], color=color, linestyle=style, label=r.model, linewidth=1.2)
                ax.axhspan(low, high, color=color, alpha=0.12, linewidth=0)
        ax.set_xscale("log", base=2)
        if epsilons:
            ax.xaxis.set_major_locator(FixedLocator(epsilons))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([f"{e:g}" for e in epsilons])
            ax.set_xlim(min(epsilons) / 1.4, max(epsilons) * 1.4)
        ax.set_ylim(bottom=0)
        ax.set(xlabel="epsilon per device (record level; user level in 'user' mode)", ylabel=metric.upper(),
               title=metric.upper())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{title}: {_devices(meta)}, {meta['items']} items, {meta['rounds']} rounds of "
                 f"{meta['devices_per_round']} devices (95% intervals over {users} test users)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

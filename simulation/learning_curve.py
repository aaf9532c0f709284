"""The learning curve of a simulated run: HR@10 per round beside the epsilon spent, from its metrics.jsonl."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fedrec.server.central_eval import KIND as CENTRAL
from fedrec.server.records import LEDGER, METRICS, RunRecords

log = logging.getLogger("fedrec.simulation")
FILE = "learning-curve.png"


def curve_points(rows: list[dict[str, Any]], ledger: list[dict[str, Any]] | None = None) -> dict[str, list[tuple]]:
    """(round, value[, error]) series: central HR@10, the federated (noised) HR@10 with its noise std, and the
    largest epsilon any device had spent after each round (cumulative: a device's figure only grows), from the
    ledger's finished rounds where given (round 0's popularity report included), else from the training rows."""
    central = sorted((r["round"], r["hr@10"]) for r in rows if r.get("kind") == CENTRAL and r.get("hr@10") is not None)
    federated = sorted((r["round"], r["hr@10"], r.get("noise_stderr") or 0.0) for r in rows
                       if r.get("kind") in ("evaluate", "final_evaluate") and r.get("hr@10") is not None)
    if ledger:
        return {"central": central, "federated": federated, "epsilon": ledger_spent(ledger)}
    spent, top = [], 0.0
    for r in sorted((r for r in rows if r.get("kind") == "train"), key=lambda r: r["round"]):
        value = r.get("epsilon_max_reported")
        if value is None:
            if r.get("epsilon_unbounded"):
                break  # a release without DP: no finite figure from here on
            value = 0.0
        top = max(top, float(value))
        spent.append((r["round"], top))
    return {"central": central, "federated": federated, "epsilon": spent}


def ledger_spent(ledger: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(round, largest epsilon reported so far) after each round the ledger closed, in ledger order; it stops at a
    release without DP (a null figure), after which no finite figure holds."""
    spent: dict[int, float] = {}
    top = 0.0
    for entry in ledger:
        if entry.get("status") != "done":
            continue
        reported = list((entry.get("epsilon_reported") or {}).values())
        if any(value is None for value in reported):
            break
        top = max([top, *reported])
        spent[int(entry["round"])] = top
    return sorted(spent.items())


def write_learning_curve(run_dir: str | Path) -> Path | None:
    """RUN/learning-curve.png, where the run has central evaluations or federated ones; None where it has neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    records = RunRecords(run_dir)
    points = curve_points(records.read_jsonl(METRICS), records.read_jsonl(LEDGER))
    if not points["central"] and not points["federated"]:
        return None
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if points["central"]:
        left.plot(*zip(*points["central"]), marker="o", color="#4477aa",
                  label="central evaluation, every device (no privacy cost)")
    if points["federated"]:
        rounds, values, errors = zip(*points["federated"])
        left.errorbar(rounds, values, yerr=errors, fmt="s", color="#ee6677", capsize=3,
                      label="federated evaluation (noised on the devices; bars: noise std of the mean)")
    left.set(xlabel="round", ylabel="HR@10", title="HR@10 per round")
    if points["central"]:
        left.set_ylim(0, 1.02)  # HR@10 lies in [0, 1]: a noised mean outside it is noise, and would flatten the curve
    left.legend(fontsize=8)
    if points["epsilon"]:
        right.step(*zip(*points["epsilon"]), where="post", color="#228833")
        budget = (summary.get("privacy", {}).get("record_level") or {}).get("budget")
        if isinstance(budget, (int, float)) and math.isfinite(budget):
            right.axhline(budget, color="#777777", linestyle=":", label=f"budget {budget:g}")
            right.legend(fontsize=8)
    right.set(xlabel="round", ylabel="epsilon spent (largest over devices)", title="privacy spent")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax is right or not points["central"]:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    if summary:
        fig.suptitle(f"{summary.get('dataset', '')}: {summary.get('devices')} devices, {summary.get('items')} items, "
                     f"{summary.get('rounds')} rounds")
    fig.tight_layout()
    path = run_dir / FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("learning curve written to %s", path)
    return path


def last_central_evaluation(metrics: Any) -> dict[str, Any] | None:
    """The last central-evaluation row of a run's metrics (a DataFrame of metrics.jsonl), or None."""
    if metrics is None or len(metrics) == 0 or "kind" not in metrics:
        return None
    rows = metrics[metrics["kind"] == CENTRAL]
    if len(rows) == 0:
        return None
    last = rows.sort_values("round").iloc[-1]
    return {key: (None if value != value else value) for key, value in last.to_dict().items()}  # NaN: absent

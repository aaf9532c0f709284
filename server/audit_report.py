"""The audit's files: audit.json (the verdict), audit.md (for a reviewer), devices.csv, and plots."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .records import dumps  # noqa: E402


def write_audit(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "audit.json", out_dir / "audit.md", out_dir / "devices.csv"]
    written[0].write_text(dumps(result, indent=2) + "\n", encoding="utf-8")
    _write_devices_csv(result, written[2])
    written += _plots(result, out_dir)
    written[1].write_text(_markdown(result, [p.name for p in written[3:]]), encoding="utf-8")
    return written


def _write_devices_csv(result: dict[str, Any], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        unit = result.get("figures", {}).get("unit", "record_level")
        others = ("honest", "own_share")  # the headline (malicious) is in the columns before
        writer.writerow(["device", "rounds_joined", "epsilon_reported", "epsilon_recomputed_rdp",
                         "epsilon_recomputed_pld", "epsilon_charged_rdp",
                         *(f"epsilon_{name}_{what}" for name in others for what in ("recomputed", "charged"))])
        for device, row in result["per_device"].items():
            figures = row.get("figures", {}).get(unit, {})
            writer.writerow([device, len(row["rounds"]), row["reported"], row["recomputed_rdp"],
                             row["recomputed_pld"], row["charged_rdp"],
                             *(figures.get(name, {}).get(what) for name in others
                               for what in ("recomputed", "charged"))])


def _plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    rows = list(result["per_device"].values())
    if not rows or not result["dp"]:
        return []
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].hist([r["recomputed_rdp"] for r in rows], bins=30, color="#4477aa")
    if result["budget"]:
        axes[0].axvline(result["budget"], color="#cc3311", linestyle="--", label=f"budget {result['budget']}")
        axes[0].legend()
    axes[0].set(xlabel="epsilon per device (recomputed, RDP)", ylabel="devices",
                title=f"record-level epsilon at delta={result['delta']:g}")
    axes[1].hist([len(r["rounds"]) for r in rows], bins=range(0, max(len(r["rounds"]) for r in rows) + 2),
                 color="#228833")
    axes[1].set(xlabel="rounds a device released in (incl. the popularity report)", ylabel="devices")
    fig.tight_layout()
    paths.append(out_dir / "epsilon_per_device.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    worst = result["worst_device"]
    if worst and worst["trajectory"]:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        rounds, eps = zip(*worst["trajectory"])
        ax.step(rounds, eps, where="post", color="#4477aa", label=worst["device"])
        if result["budget"]:
            ax.axhline(result["budget"], color="#cc3311", linestyle="--", label="budget")
        ax.set(xlabel="server round", ylabel="cumulative epsilon", title="worst-case device over the run")
        ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "epsilon_worst_device.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _number(value: Any) -> str:
    return "unbounded" if value is None else f"{value:.4f}"


def _figures_table(result: dict[str, Any]) -> list[str]:
    """The secure modes' three figures, each with the threat it holds against (the headline: malicious)."""
    secure, figures = result["secure_aggregation"], result["figures"]
    colluders = secure.get("colluders")
    lines = ["", "## Figures by threat", "",
             f"Each release is accounted with the (t, c) the device says it used (t from {secure.get('t_min')}, c from "
             f"{colluders}); 'charged' adds what the server may have received unseen (rejected, failed, unfinished).",
             ""]
    for unit in ("record_level", "user_level"):
        if unit not in figures:
            continue
        lines += [f"| {unit.replace('_', ' ')} | holds when | reported max | recomputed max | charged max |",
                  "|---|---|---|---|---|"]
        for name, row in figures[unit].items():
            headline = " **(headline; budget enforced)**" if row.get("budget") is not None else ""
            reported = "-" if row["epsilon_max_reported"] is None else f"{row['epsilon_max_reported']:.4f}"
            lines.append(f"| {row['name']}{headline} | {row['threat']} | {reported} | "
                         f"{_number(row['epsilon_max_recomputed'])} | {_number(row['epsilon_max_charged'])} |")
        lines.append("")
    return lines


def _markdown(result: dict[str, Any], images: list[str]) -> str:
    lines = [f"# Privacy audit: {result['verdict'].upper()}", "", f"Run: `{result['run_dir']}`", ""]
    if not result["dp"]:
        lines += ["**The run did not use differential privacy: its updates carry no privacy guarantee.**", ""]
    pct = result["epsilon_percentiles_recomputed"]
    lines += [
        "| quantity | value |", "|---|---|",
        f"| devices that released anything | {result['devices']} |",
        f"| delta | {result['delta']:g} |",
        f"| budget per device | {result['budget']} |",
        f"| epsilon max, reported by devices | {result['epsilon_max_reported']:.4f} |",
        f"| epsilon max, recomputed (dp-accounting RDP) | {result['epsilon_max_recomputed']:.4f} |",
        f"| epsilon max, recomputed (dp-accounting PLD, tighter) | {result['epsilon_max_recomputed_pld']:.4f} |",
        f"| epsilon max, charged (with releases the server may not have seen: rejected, failed, unfinished "
        f"rounds) | {result['epsilon_max_charged']:.4f} |",
        f"| epsilon p50 / p90 / p99 (recomputed) | {pct['p50']:.4f} / {pct['p90']:.4f} / {pct['p99']:.4f} |",
        f"| largest relative difference reported vs recomputed | {result['max_relative_diff']:.2e} "
        f"(tolerance {result['tolerance']:g}) |",
        f"| devices within budget | {result['within_budget']} of {result['devices']} |",
        f"| rounds joined per device, max / median | {result['rounds_joined']['max']} / "
        f"{result['rounds_joined']['median']:g} |",
    ]
    if "user_level" in result:
        for name, value in result["user_level"].items():
            lines.append(f"| user-level DP: {name} | {value} |")
    if "secure_aggregation" in result and "figures" in result:
        lines += _figures_table(result)
    lines += ["", "## What the numbers mean", ""]
    lines += [f"- **Neighbouring relation.** {result['assumptions']['neighbouring']}",
              f"- **Sampling.** {result['assumptions']['sampling']}",
              f"- **Not covered.** {result['assumptions']['not_covered']}",
              f"- **How it was checked.** Every device's epsilon was recomputed from the rounds' plans in the ledger "
              f"with {result['accountants']['compared']}, and compared with what the device reported; "
              f"{result['accountants']['reference']} is shown for reference.", ""]
    lines += ["## Flags", ""]
    if not result["flags"]:
        lines.append("None.")
    for flag in result["flags"][:200]:
        lines.append(f"- **{flag['severity']}** `{flag['code']}`: {flag['message']}")
    if len(result["flags"]) > 200:
        lines.append(f"- ... and {len(result['flags']) - 200} more (see audit.json)")
    lines += [""] + [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"

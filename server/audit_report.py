"""The audit's files: audit.json (the verdict), audit.md (for diffs), audit.html (one page), devices.csv, plots."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedrec.shared.provenance import describe  # noqa: E402

from .audit_figures import BOUND_SENTENCE, UNIT_LABELS  # noqa: E402
from .audit_html import audit_page  # noqa: E402
from .records import dumps  # noqa: E402

PLOTS = {"per_device": "epsilon_per_device.png", "by_threat": "epsilon_by_figure.png",
         "worst": "epsilon_worst_device.png"}


def write_audit(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "audit.json", out_dir / "audit.md", out_dir / "devices.csv", out_dir / "audit.html"]
    written[0].write_text(dumps(result, indent=2) + "\n", encoding="utf-8")
    _write_devices_csv(result, written[2])
    plots = _plots(result, out_dir)
    written[1].write_text(_markdown(result, [p.name for p in plots.values()]), encoding="utf-8")
    written[3].write_text(audit_page(result, verdict_lines(result), plots), encoding="utf-8")
    return written + list(plots.values())


def headline_label(result: dict[str, Any]) -> str:
    """The headline figure's name, by unit and threat ('record level, device-side noise (headline)')."""
    rows = [row for row in result.get("figure_table", []) if row["headline"]]
    return rows[0]["label"] if rows else "record level (headline)"


def verdict_lines(result: dict[str, Any]) -> list[str]:
    """The console verdict: one line of counts, then every figure by unit and threat with what it protects against,
    then the first flags."""
    lines = [f"privacy audit: {result['verdict'].upper()} - {result['devices']} devices, "
             f"{len(result['over_budget'])} over budget, {len(result['flags'])} flags, largest relative difference "
             f"reported vs recomputed {result['max_relative_diff']:.1e}"]
    if not result["dp"]:
        lines.append("  the run did not use differential privacy: its updates carry no privacy guarantee")
    for row in result.get("figure_table", []):
        budget = "" if row["budget"] is None else f"; budget {row['budget']:g}"
        note = f"; {row['note']}" if row.get("note") else ""
        lines.append(f"  {row['label']}: epsilon max {_number(row['recomputed_max'])} recomputed "
                     f"({_beside(row)}reported {_number(row['reported_max'])}, charged {_number(row['charged_max'])})"
                     f"{budget}{note}")
        lines.append(f"      protects against {row['protects_against']}")
    lines += [f"  {f['severity']}: {f['message']}" for f in result["flags"][:20]]
    if len(result["flags"]) > 20:
        lines.append(f"  ... and {len(result['flags']) - 20} more flags (audit.md, audit.json)")
    return lines


def _beside(row: dict[str, Any]) -> str:
    """The other accountants' figures, where the device's accountant is not RDP ('RDP 4.4197, ')."""
    return "".join(f"{name.upper()} {_number(value)}, " for name, value in row.get("by_accountant", {}).items()
                   if name != row.get("accountant"))


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


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


def _plots(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """The plots, by PLOTS key: per-device distribution of the headline and of rounds joined, every figure's spread
    over devices, the worst device over the run."""
    if not result["per_device"] or not result["dp"]:
        return {}
    figures = {"per_device": per_device_figure(result), "by_threat": by_figure_figure(result),
               "worst": worst_device_figure(result)}
    return {key: _save(fig, out_dir / PLOTS[key]) for key, fig in figures.items() if fig is not None}


def per_device_figure(result: dict[str, Any]) -> Any:
    """The headline per device (its title names unit and threat) and the rounds each device released in."""
    rows = list(result["per_device"].values())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].hist([r["recomputed_rdp"] for r in rows], bins=30, color="#4477aa")
    if result["budget"]:
        axes[0].axvline(result["budget"], color="#cc3311", linestyle="--", label=f"budget {result['budget']:g}")
        axes[0].legend()
    axes[0].set(xlabel="epsilon per device (recomputed)", ylabel="devices",
                title=f"{headline_label(result)}\nat delta={result['delta']:g}")
    axes[0].title.set_fontsize(9)
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    most = max(len(r["rounds"]) for r in rows)
    axes[1].hist([len(r["rounds"]) for r in rows], bins=[b - 0.5 for b in range(0, most + 2)], color="#228833",
                 rwidth=0.9)
    for axis in (axes[1].xaxis, axes[1].yaxis):  # counts: whole numbers only
        axis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set(xlabel="rounds a device released in (incl. the popularity report)", ylabel="devices")
    fig.tight_layout()
    return fig


def by_figure_figure(result: dict[str, Any]) -> Any:
    """Every figure the devices state, by unit and threat, over devices (None where there is only the headline)."""
    spread = _figure_spread(result)
    if len(spread) < 2:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(spread) + 1.4))
    labels = list(spread)
    ax.boxplot([spread[label] for label in labels], orientation="horizontal", whis=(0, 100))
    ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.invert_yaxis()  # the headline first, at the top
    if result["budget"]:
        ax.axvline(result["budget"], color="#cc3311", linestyle="--", label=f"budget {result['budget']:g}")
        ax.legend(fontsize=8)
    if max(max(v) for v in spread.values()) > 20 * max(min(min(v) for v in spread.values()), 1e-3):
        ax.set_xscale("log")  # an own-share figure can be 20x the headline
    ax.set(xlabel="epsilon per device (recomputed)", title="every figure, by unit and threat, over devices")
    fig.tight_layout()
    return fig


def worst_device_figure(result: dict[str, Any]) -> Any:
    """The worst device's cumulative headline per round, from epsilon 0, so what round 0's popularity report spent
    shows (None without one)."""
    worst = result["worst_device"]
    if not worst or not worst["trajectory"]:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    rounds, eps = zip(*worst["trajectory"])
    ax.step(rounds, eps, where="post", color="#4477aa", marker="o", markersize=3, label=worst["device"])
    if rounds[0] == 0:  # the popularity report, spent before any training round
        ax.annotate(f"round 0 (popularity report): {eps[0]:.2f}", (0, eps[0]), xytext=(8, -14),
                    textcoords="offset points", fontsize=8)
    if result["budget"]:
        ax.axhline(result["budget"], color="#cc3311", linestyle="--", label="budget")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=min(rounds[0], 0) - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="server round", ylabel="cumulative epsilon",
           title=f"worst-case device over the run: {headline_label(result)}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _figure_spread(result: dict[str, Any]) -> dict[str, list[float]]:
    """label -> every device's recomputed figure (finite ones), for the rows devices state one by one."""
    names = {"local": result.get("figures", {}).get("headline", "malicious")}
    out = {}
    for row in result.get("figure_table", []):
        if row["figure"] == "central":
            continue
        name = names.get(row["figure"], row["figure"])
        values = [value for device in result["per_device"].values()
                  if (value := device.get("figures", {}).get(row["unit"], {}).get(name, {}).get("recomputed"))
                  is not None]
        if values:
            out[row["label"]] = values
    return out


def _figures_table(result: dict[str, Any]) -> list[str]:
    """Every figure, named by unit and threat, with what it protects against (the headline first)."""
    lines = ["## Every figure, by unit and threat", "",
             "The largest value over devices: recomputed from the ledger with the device's own accountant (other "
             "accountants beside it), as the devices reported it, and charged with what the server may have received "
             "unseen (rejected, failed, unfinished rounds).", "",
             "| figure | protects against | recomputed max | reported max | charged max | budget |",
             "|---|---|---|---|---|---|"]
    for row in result.get("figure_table", []):
        name = f"**{row['label']}**" if row["headline"] else row["label"]
        note = f" ({row['note']})" if row.get("note") else ""
        beside = f" ({_beside(row).rstrip(', ')})" if _beside(row) else ""
        budget = "-" if row["budget"] is None else f"{row['budget']:g}"
        lines.append(f"| {name}{note} | {row['protects_against']} | {_number(row['recomputed_max'])}{beside} | "
                     f"{_number(row['reported_max'])} | {_number(row['charged_max'])} | {budget} |")
    secure = result.get("secure_aggregation")
    if secure:
        lines += ["", f"Each secure release is accounted with the (t, c) the device says it used (t from "
                      f"{secure.get('t_min')}, c from {secure.get('colluders')})."]
    return lines + [""]


def _accountants_used(result: dict[str, Any]) -> str:
    """'rdp: <what it is>; ...' for the accountants the figure table names."""
    used = dict.fromkeys(row["accountant"] for row in result.get("figure_table", [])) or {"rdp": None}
    return "; ".join(f"{name}: {result['accountants'].get(name, name)}" for name in used)


def attacks_lines(attacks: dict[str, Any]) -> list[str]:
    """The empirical attacks (RUN/audit-attacks.json), with the federation they ran on."""
    fed = attacks["federation"]
    own = fed.get("from_audited_run")
    lines = ["## Empirical attacks", "",
             "Ran on " + ("the audited run's own configuration" if own else "a separate federation, not the audited "
                          "run") + ": " + ", ".join(f"{key} {value}" for key, value in fed.items()
                                                   if key != "from_audited_run") + ".", "", BOUND_SENTENCE, "",
             "| attack | threat | success | epsilon | largest it could show | accountant's epsilon | meaning |",
             "|---|---|---|---|---|---|---|"]
    for attack in attacks["attacks"]:
        s = attack["success"]
        bound = "-" if attack.get("bound") is None else f"{attack['bound']:.2f} ({attack['bound_kind']})"
        lines.append(f"| {attack['name']} | {attack['threat']} | {s['hits']} of {s['trials']} {s['label']} | {bound} "
                     f"| {_number(attack.get('max_bound'))} | {_number(attack.get('epsilon_accountant'))} | "
                     f"{attack['meaning']} |")
    return lines + [""]


def _markdown(result: dict[str, Any], images: list[str]) -> str:
    lines = [f"# Privacy audit: {result['verdict'].upper()}", "", f"Run: `{result['run_dir']}`", ""]
    if not result["dp"]:
        lines += ["**The run did not use differential privacy: its updates carry no privacy guarantee.**", ""]
    pct = result["epsilon_percentiles_recomputed"]
    headline = headline_label(result)
    lines += [
        "| quantity | value |", "|---|---|",
        f"| devices that released anything | {result['devices']} |",
        f"| delta | {result['delta']:g} |",
        f"| budget per device ({headline}) | {result['budget']} |",
        f"| {headline}: p50 / p90 / p99 over devices (recomputed) | {pct['p50']:.4f} / {pct['p90']:.4f} / "
        f"{pct['p99']:.4f} |",
        f"| {headline}: max, PLD (tighter reference) | {result['epsilon_max_recomputed_pld']:.4f} |",
        f"| largest relative difference reported vs recomputed | {result['max_relative_diff']:.2e} "
        f"(tolerance {result['tolerance']:g}) |",
        f"| devices within budget | {result['within_budget']} of {result['devices']} |",
        f"| rounds joined per device, max / median | {result['rounds_joined']['max']} / "
        f"{result['rounds_joined']['median']:g} |", ""]
    lines += _figures_table(result)
    if "user_level" in result:
        lines += ["### User level, central DP", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in result["user_level"].items()] + [""]
    assumptions = result["assumptions"]
    lines += ["## What the numbers mean", ""]
    relations = assumptions.get("neighbouring_by_unit") or {"record_level": assumptions["neighbouring"]}
    lines += [f"- **Neighbouring relation, {UNIT_LABELS.get(unit, unit)}.** {text}" for unit, text in relations.items()]
    lines += [f"- **Sampling.** {assumptions['sampling']}",
              f"- **Not covered.** {assumptions['not_covered']}",
              f"- **How it was checked.** Every device's figures were recomputed from the rounds' plans in the ledger "
              f"with the device's own accountant ({_accountants_used(result)}) and compared with what the device "
              f"reported; {result['accountants']['reference']} is shown for the headline.", ""]
    if result.get("attacks"):
        lines += attacks_lines(result["attacks"])
    lines += ["## Flags", ""]
    if not result["flags"]:
        lines.append("None.")
    for flag in result["flags"][:200]:
        lines.append(f"- **{flag['severity']}** `{flag['code']}`: {flag['message']}")
    if len(result["flags"]) > 200:
        lines.append(f"- ... and {len(result['flags']) - 200} more (see audit.json)")
    lines += ["", "## Provenance", ""] + provenance_lines(result.get("provenance", {}))
    lines += [""] + [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def provenance_lines(provenance: dict[str, Any]) -> list[str]:
    """Versions: the audit's own, and what the run recorded (each server process's first ledger line, summary)."""
    lines = []
    audit = provenance.get("audit")
    if audit:
        lines.append("- audited with " + describe(audit))
    run = provenance.get("run") or {}
    for session in run.get("ledger", []):
        lines.append(f"- run, from its {session.get('kind')} round {session.get('round')} on: "
                     + describe(session["versions"]))
    if run.get("summary"):
        lines.append("- run's summary.json written with " + describe(run["summary"]))
    if not run.get("ledger"):
        lines.append("- the run recorded no versions (a ledger from before provenance was recorded)")
    return lines

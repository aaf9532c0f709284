"""audit.html: the whole audit on one page that needs nothing else (inline CSS, plots as data: URIs, no script)."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

from fedrec.shared.provenance import describe

from .audit_figures import BOUND_SENTENCE, UNIT_LABELS

CSS = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; }
.pass { color: #1b7a36; } .fail { color: #b3261e; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.headline td { font-weight: 600; background: #eef4fb; }
.error { color: #b3261e; font-weight: 600; } .warning { color: #9a6700; } .info { color: #555; }
img { max-width: 100%; height: auto; display: block; margin: 0.4rem 0; }
.note { color: #555; font-size: 0.9rem; }
"""


def audit_page(result: dict[str, Any], console: list[str], plots: dict[str, Path]) -> str:
    """The page: verdict, flags, every figure, per-device distribution, worst device, what is not covered, attacks,
    provenance. `console`: the console verdict's lines (the first, its counts, heads the page); `plots`: PLOTS key ->
    a PNG written beside it."""
    verdict = result["verdict"]
    parts = [f'<h1 id="verdict" class="{escape(verdict)}">Privacy audit: {escape(verdict.upper())}</h1>',
             f'<p class="note">Run <code>{escape(result["run_dir"])}</code>: {result["devices"]} devices released '
             f'something; delta {result["delta"]:g}; budget per device {escape(str(result["budget"]))}.</p>']
    if not result["dp"]:
        parts.append('<p class="error">The run did not use differential privacy: its updates carry no privacy '
                     'guarantee.</p>')
    parts.append(f'<p id="summary">{escape(console[0])}</p>' if console else "")
    parts += _flags(result["flags"])
    parts += _figures(result)
    parts += _distribution(result, plots)
    parts += _worst(result, plots)
    parts += _meaning(result)
    if result.get("attacks"):
        parts += _attacks(result["attacks"])
    parts += _provenance(result.get("provenance", {}))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Privacy audit: {escape(verdict.upper())}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    """A table of already-escaped cells (numbers right-aligned); `classes`: one CSS class per row, or ''."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{classes[index]}"' if classes and classes[index] else ""
        cells = "".join(f'<td class="num">{c}</td>' if _numeric(c) else f"<td>{c}</td>" for c in row)
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _numeric(cell: str) -> bool:
    """A short cell that starts with a number (or is '-'): right-aligned, never wrapped."""
    if cell == "-":
        return True
    try:
        float(cell.split(" ", 1)[0])
    except ValueError:
        return False
    return len(cell) <= 24


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _image(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _flags(flags: list[dict[str, Any]]) -> list[str]:
    out = ['<h2 id="flags">Flags</h2>']
    if not flags:
        return out + ["<p>None.</p>"]
    rows = [[f'<span class="{escape(f["severity"])}">{escape(f["severity"])}</span>', f"<code>{escape(f['code'])}"
             "</code>", escape(f["message"])] for f in flags[:500]]
    out.append(_table(["severity", "code", "message"], rows))
    if len(flags) > 500:
        out.append(f"<p>... and {len(flags) - 500} more (audit.json).</p>")
    return out


def _figures(result: dict[str, Any]) -> list[str]:
    rows, classes = [], []
    for row in result.get("figure_table", []):
        beside = "; ".join(f"{escape(name.upper())} {_number(value)}" for name, value in row["by_accountant"].items()
                           if name != row["accountant"])
        note = f'<br><span class="note">{escape(row["note"])}</span>' if row.get("note") else ""
        rows.append([escape(row["label"]) + note, escape(row["protects_against"]), _number(row["recomputed_max"]),
                     beside or "-", _number(row["reported_max"]), _number(row["charged_max"]),
                     "-" if row["budget"] is None else f"{row['budget']:g}"])
        classes.append("headline" if row["headline"] else "")
    return ['<h2 id="figures">Every figure, by unit and threat</h2>',
            '<p class="note">Largest value over devices: recomputed from the ledger with the device\'s own accountant '
            '(another accountant beside it where they differ), as the devices reported it, and charged with what the '
            'server may have received unseen (rejected, failed, unfinished rounds). The budget is enforced on the '
            'headline.</p>',
            _table(["figure", "protects against", "recomputed max", "other accountant", "reported max",
                    "charged max", "budget"], rows, classes)]


def _distribution(result: dict[str, Any], plots: dict[str, Path]) -> list[str]:
    pct = result["epsilon_percentiles_recomputed"]
    headline = escape(next((row["label"] for row in result.get("figure_table", []) if row["headline"]), "headline"))
    rows = [["devices that released anything", str(result["devices"])],
            ["devices within budget", f"{result['within_budget']} of {result['devices']}"],
            [f"{headline}: p50 / p90 / p99 over devices (recomputed)",
             f"{pct['p50']:.4f} / {pct['p90']:.4f} / {pct['p99']:.4f}"],
            [f"{headline}: max, PLD (tighter reference)", _number(result["epsilon_max_recomputed_pld"])],
            ["largest relative difference reported vs recomputed",
             f"{result['max_relative_diff']:.2e} (tolerance {result['tolerance']:g})"],
            ["rounds joined per device, max / median",
             f"{result['rounds_joined']['max']} / {result['rounds_joined']['median']:g}"]]
    return ['<h2 id="distribution">Per-device distribution</h2>', _table(["quantity", "value"], rows),
            _image(plots.get("per_device"), "epsilon per device and rounds joined"),
            _image(plots.get("by_threat"), "every figure over devices, by unit and threat")]


def _worst(result: dict[str, Any], plots: dict[str, Path]) -> list[str]:
    worst = result.get("worst_device")
    if not worst or not worst["trajectory"]:
        return []
    rows = [[str(rnd), _number(eps)] for rnd, eps in worst["trajectory"]]
    return [f'<h2 id="worst">The worst device over the run: <code>{escape(worst["device"])}</code></h2>',
            _image(plots.get("worst"), "cumulative epsilon of the worst device per round"),
            "<details><summary>its cumulative headline epsilon after each round it released in (round 0: the "
            "popularity report)</summary>" + _table(["round", "epsilon"], rows) + "</details>"]


def _meaning(result: dict[str, Any]) -> list[str]:
    assumptions = result["assumptions"]
    relations = assumptions.get("neighbouring_by_unit") or {"record_level": assumptions["neighbouring"]}
    items = [f"<li><b>Neighbouring relation, {escape(UNIT_LABELS.get(unit, unit))}.</b> {escape(text)}</li>"
             for unit, text in relations.items()]
    items.append(f"<li><b>Sampling.</b> {escape(assumptions['sampling'])}</li>")
    return ['<h2 id="meaning">What the numbers mean</h2>', "<ul>" + "".join(items) + "</ul>",
            '<h2 id="not-covered">What is not covered</h2>', f"<p>{escape(assumptions['not_covered'])}</p>"]


def _attacks(attacks: dict[str, Any]) -> list[str]:
    fed = attacks["federation"]
    where = ("the audited run's own configuration" if fed.get("from_audited_run")
             else "a separate federation, not the audited run")
    described = ", ".join(f"{escape(str(key))} {escape(str(value))}" for key, value in fed.items()
                          if key != "from_audited_run")
    rows = []
    for attack in attacks["attacks"]:
        s = attack["success"]
        bound = "-" if attack.get("bound") is None else f"{attack['bound']:.2f} ({escape(attack['bound_kind'])})"
        rows.append([escape(attack["name"]), escape(attack["threat"]),
                     f"{s['hits']} of {s['trials']} {escape(s['label'])}", bound, _number(attack.get("max_bound"), 2),
                     _number(attack.get("epsilon_accountant"), 2), escape(attack["meaning"])])
    return ['<h2 id="attacks">Empirical attacks</h2>', f"<p>Ran on {where}: {described}.</p>",
            f"<p>{escape(BOUND_SENTENCE)}</p>",
            _table(["attack", "threat", "success", "epsilon", "largest it could show", "accountant's epsilon",
                    "meaning"], rows)]


def _provenance(provenance: dict[str, Any]) -> list[str]:
    rows = []
    if provenance.get("audit"):
        rows.append(["this audit", escape(describe(provenance["audit"]))])
    run = provenance.get("run") or {}
    for session in run.get("ledger", []):
        rows.append([f"run, from {escape(str(session.get('kind')))} round {escape(str(session.get('round')))}",
                     escape(describe(session["versions"]))])
    if run.get("summary"):
        rows.append(["run's summary.json", escape(describe(run["summary"]))])
    if not run.get("ledger"):
        rows.append(["run", "no versions recorded (a ledger from before provenance was recorded)"])
    return ['<h2 id="provenance">Provenance</h2>', _table(["what", "versions"], rows)]

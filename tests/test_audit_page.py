"""The audit's presentation: every figure named by unit and threat in the console, audit.md, audit.json and the
plots; the empirical attacks file; audit.html self-contained and (e2e) rendered by a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from html import escape, unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedrec.server.audit import audit_run
from fedrec.server.audit_figures import ATTACKS_FILE, BOUND_SENTENCE, PROTECTS
from fedrec.server.audit_report import per_device_figure, worst_device_figure, write_audit
from fedrec.simulation.cli import main as fedrec
from tests.test_audit import write_honest_run

SIX = [0, 1, 2, 3, 4, 5]
# The rows each mode states, headline first: (unit, figure) in the order of audit.json's figure_table.
EXPECTED = {
    "local": [("record_level", "local")],
    "distributed": [("record_level", name) for name in ("malicious", "honest", "own_share")],
    "user": [(unit, name) for unit in ("user_level", "record_level") for name in ("malicious", "honest", "own_share")],
}
ATTACKS = {  # the form `fedrec audit RUN --attacks` writes (simulation/attacks.py)
    "federation": {"mode": "distributed", "epsilon": 8.0, "delta": 1e-5, "devices": 300, "items": 120, "rounds": 8,
                   "devices_per_round": 150, "dataset": "synthetic", "seed": 7, "from_audited_run": False},
    "attacks": [
        {"name": "record canaries (decrypted sums)", "threat": "honest but curious server",
         "success": {"hits": 61, "trials": 120, "label": "guesses right of guesses made"}, "bound": 0.0,
         "bound_kind": "lower bound", "max_bound": 4.61, "meaning": "the true epsilon is at least this",
         "epsilon_accountant": 7.93},
        {"name": "canary devices, one shot", "threat": "own share (aggregation subverted)",
         "success": {"hits": 140, "trials": 150, "label": "canaries scored above the threshold"}, "bound": 37.5,
         "bound_kind": "estimate", "max_bound": None, "meaning": "an estimate, not a bound"},
    ],
}


def audited(tmp_path: Path, privacy: str, attacks: dict | str | None = None) -> tuple[dict, Path]:
    run = tmp_path / privacy
    write_honest_run(run, sigma=1.5, rounds=2, participation=[SIX, SIX], privacy=privacy, budget=8.0,
                     **({"t_min": 5, "colluders": 1} if privacy != "local" else {}))
    if attacks is not None:
        (run / ATTACKS_FILE).write_text(attacks if isinstance(attacks, str) else json.dumps(attacks))
    result = audit_run(run)
    write_audit(result, run / "audit")
    return result, run / "audit"


@pytest.mark.parametrize("privacy", ["local", "distributed", "user"])
def test_every_figure_is_named_by_unit_and_threat_everywhere(tmp_path, capsys, privacy):
    result, out = audited(tmp_path, privacy)
    rows = result["figure_table"]
    assert [(row["unit"], row["figure"]) for row in rows] == EXPECTED[privacy]
    assert [row["headline"] for row in rows] == [True] + [False] * (len(rows) - 1)
    assert rows[0]["budget"] == 8.0 and all(row["budget"] is None for row in rows[1:])
    block = result["figures"][rows[0]["unit"]]["malicious"]  # the headline row is the audit's headline figure
    assert rows[0]["recomputed_max"] == pytest.approx(block["epsilon_max_recomputed"])
    assert fedrec(["audit", str(out.parent), "--out", str(tmp_path / "cli")]) == 0
    console = capsys.readouterr().out
    markdown, page = (out / "audit.md").read_text(), unescape((out / "audit.html").read_text())
    stored = json.loads((out / "audit.json").read_text())["figure_table"]
    for row, saved in zip(rows, stored, strict=True):
        assert saved["label"] == row["label"] and saved["protects_against"] == PROTECTS[row["figure"]]
        unit = row["unit"].replace("_", " ")
        assert row["label"].startswith(unit)
        for text in (console, markdown, page):
            assert row["label"] in text and row["protects_against"] in text
            assert f"{row['recomputed_max']:.4f}" in text
    if privacy == "user":  # the record-level figures of a user-level run are there, marked as not enforced
        record = [row for row in rows if row["unit"] == "record_level"]
        assert all(row["note"] == "not enforced in user mode: it may pass the budget" for row in record)
        assert record[0]["recomputed_max"] > rows[0]["recomputed_max"]
    relations = result["assumptions"]["neighbouring_by_unit"]
    assert set(relations) == {row["unit"] for row in rows}
    assert result["assumptions"]["neighbouring"].startswith("User level" if privacy == "user" else "Record level")
    for unit, text in relations.items():
        assert f"Neighbouring relation, {unit.replace('_', ' ')}.** {text}" in markdown
    if privacy == "user":
        assert "(device, item) pair" not in result["assumptions"]["neighbouring"]
        assert markdown.index("Neighbouring relation, user level") < markdown.index("Neighbouring relation, record")


def test_the_device_accountant_is_shown_with_rdp_beside_it(tmp_path):
    result, out = audited(tmp_path, "local")
    row = result["figure_table"][0]
    assert row["accountant"] == "exact-gaussian" and set(row["by_accountant"]) == {"exact-gaussian", "rdp"}
    assert row["by_accountant"]["rdp"] > row["recomputed_max"]  # q = 1 releases: the exact figure is tighter
    assert f"RDP {row['by_accountant']['rdp']:.4f}" in (out / "audit.md").read_text()
    secure, _ = audited(tmp_path, "distributed")
    assert all(row["by_accountant"] == {"rdp": row["recomputed_max"]} for row in secure["figure_table"])


def test_the_plots_name_the_headline_start_at_zero_and_count_in_whole_numbers(tmp_path):
    result, out = audited(tmp_path, "user")
    result["worst_device"]["trajectory"].insert(0, (0, 3.0))  # a popularity report spent in round 0
    worst = worst_device_figure(result)
    ax = worst.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_xlim()[0] < 0
    assert "user level, malicious server with c colluders (headline)" in ax.get_title()
    assert any("round 0 (popularity report): 3.00" in text.get_text() for text in ax.texts)
    histogram, rounds = per_device_figure(result).axes
    assert histogram.get_title().startswith("user level, malicious server with c colluders (headline)")
    assert all(float(tick).is_integer() for tick in rounds.get_xticks())
    assert all(float(tick).is_integer() for tick in rounds.get_yticks())
    for name in ("epsilon_per_device.png", "epsilon_by_figure.png", "epsilon_worst_device.png"):
        assert (out / name).stat().st_size > 1000


def test_the_attacks_file_is_rendered_with_its_federation_and_what_a_bound_means(tmp_path, capsys):
    result, out = audited(tmp_path, "distributed", attacks=ATTACKS)
    assert result["attacks"] == ATTACKS and result["verdict"] == "pass"
    markdown, page = (out / "audit.md").read_text(), unescape((out / "audit.html").read_text())
    for text in (markdown, page):
        assert BOUND_SENTENCE in text and "a separate federation, not the audited run" in text
        assert "0.00 (lower bound)" in text and "37.50 (estimate)" in text and "4.61" in text and "7.93" in text
        assert "61 of 120 guesses right of guesses made" in text
    assert json.loads((out / "audit.json").read_text())["attacks"] == ATTACKS
    assert fedrec(["audit", str(out.parent), "--out", str(tmp_path / "cli")]) == 0
    console = capsys.readouterr().out
    assert "a separate federation" in console and "record canaries (decrypted sums)" in console


@pytest.mark.parametrize("broken,field", [("{not json", "not readable JSON"), (json.dumps({"attacks": []}), "federation"),
                                          (json.dumps({**ATTACKS, "attacks": [{**ATTACKS["attacks"][0],
                                                                               "bound_kind": "upper bound"}]}),
                                           "attacks[0].bound_kind")])
def test_an_unreadable_attacks_file_is_a_warning_naming_the_field(tmp_path, broken, field):
    result, out = audited(tmp_path, "local", attacks=broken)
    flags = [f for f in result["flags"] if f["code"] == "attacks_unreadable"]
    assert result["verdict"] == "pass" and "attacks" not in result
    assert len(flags) == 1 and flags[0]["severity"] == "warning" and field in flags[0]["message"]
    assert ATTACKS_FILE in flags[0]["message"] and "Empirical attacks" not in (out / "audit.md").read_text()


class Resources(HTMLParser):
    """Every tag, and every URL a page would fetch or link to."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.urls += [value or "" for name, value in attrs if name in ("src", "href", "srcset", "data", "poster")]


def test_the_page_is_self_contained_and_holds_the_verdict_and_every_figure(tmp_path):
    result, out = audited(tmp_path, "user", attacks=ATTACKS)
    page = (out / "audit.html").read_text()
    parser = Resources()
    parser.feed(page)
    assert parser.urls and all(url.startswith("data:image/png;base64,") for url in parser.urls)
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    assert "http://" not in page and "https://" not in page and "url(" not in page and "@import" not in page
    assert parser.tags.count("img") == 3  # per device, every figure, the worst device
    assert '<h1 id="verdict" class="pass">Privacy audit: PASS</h1>' in page
    for row in result["figure_table"]:
        assert escape(row["label"]) in page and f"{row['recomputed_max']:.4f}" in page
    for section in ("flags", "figures", "distribution", "worst", "not-covered", "attacks", "provenance"):
        assert f'id="{section}"' in page
    assert escape(result["assumptions"]["not_covered"]) in page


def test_a_failing_run_says_so_on_the_page(tmp_path):
    write_honest_run(tmp_path / "run", sigma=1.0, rounds=3, participation=[[0], [0], [0]], budget=5.0)
    write_audit(audit_run(tmp_path / "run"), tmp_path / "out")
    page = (tmp_path / "out" / "audit.html").read_text()
    assert '<h1 id="verdict" class="fail">Privacy audit: FAIL</h1>' in page and "over_budget" in page


# --- the page in a real browser (Debian's chromium, installed by .ci/run) ---

def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(page: Path, screenshot: Path) -> tuple[str, list[str]]:
    """(the DOM after rendering, the messages the page wrote to the browser's console), by chromium's command line."""
    done = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600",
                           f"--screenshot={screenshot}", "--dump-dom", "--enable-logging=stderr", "--v=0",
                           f"--user-data-dir={screenshot.parent / 'profile'}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=180, check=True)
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def coloured_pixels(png: Path, rgb: tuple[int, int, int], rows: int) -> int:
    """How many pixels of the screenshot's top `rows` rows have colour `rgb` (within 6 per channel)."""
    import matplotlib.image

    image = matplotlib.image.imread(png)[:rows, :, :3] * 255
    return int((abs(image - rgb) <= 6).all(axis=-1).sum())


@pytest.mark.e2e
def test_the_page_renders_in_a_headless_browser_without_console_errors(tmp_path):
    if browser() is None:
        pytest.skip("no headless browser: install Debian's chromium (apt-get install chromium; .ci/run does)")
    broken = tmp_path / "broken.html"  # the check itself can fail: a page that writes to the console
    broken.write_text("<!DOCTYPE html><html><body><script>console.error('boom')</script></body></html>")
    assert any("boom" in line for line in render(broken, tmp_path / "broken.png")[1])
    _, out = audited(tmp_path, "user", attacks=ATTACKS)
    dom, console = render(out / "audit.html", tmp_path / "audit.png")
    assert console == []
    assert '<h1 id="verdict" class="pass">Privacy audit: PASS</h1>' in dom and "Empirical attacks" in dom
    assert (tmp_path / "audit.png").stat().st_size > 10_000
    assert coloured_pixels(tmp_path / "audit.png", (0x1B, 0x7A, 0x36), rows=80) > 50  # the green verdict shows


def test_a_trusted_server_user_level_figure_is_its_own_row():
    from fedrec.server.audit_figures import assumptions, figure_table
    from fedrec.shared.config import RunConfig

    config = RunConfig(central_noise_multiplier=1.0, delta_clip_norm=5.0)
    central = {"epsilon_recomputed": 3.2, "epsilon_claimed": 3.1, "sampling": "poisson"}
    rows = figure_table(config, {}, ("record",), headline="malicious", accountant_of={"record": "rdp"},
                        user_level=central)
    assert [(row["unit"], row["figure"], row["headline"]) for row in rows] == \
        [("record_level", "local", True), ("user_level", "central", False)]
    assert rows[1]["recomputed_max"] == 3.2 and rows[1]["reported_max"] == 3.1 and rows[1]["budget"] is None
    assert "not the server" in rows[1]["protects_against"]
    assert set(assumptions(config)["neighbouring_by_unit"]) == {"record_level", "user_level"}

"""The audit of the secure modes against a malicious server: the (t, c) devices saw, three figures by threat, and
every release a device may have made unseen (issue 17). Synthetic ledgers only (tests/test_audit.py's helper)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrec.server.audit import FIGURES, THREATS, audit_run
from fedrec.server.core import ServerRandomness
from fedrec.server.records import RunRecords
from fedrec.server.summary import THREATS as SUMMARY_THREATS
from fedrec.server.summary import privacy_summary
from tests.conftest import read_jsonl
from tests.test_audit import write_honest_run

SIGMA = 1.5
SIX = [0, 1, 2, 3, 4, 5]


def codes(result: dict, severity: str | None = None) -> set[str]:
    return {f["code"] for f in result["flags"] if severity is None or f["severity"] == severity}


def figures(result: dict, device: str, unit: str | None = None) -> dict[str, dict[str, float]]:
    return result["per_device"][device]["figures"][unit or result["figures"]["unit"]]


def rewrite(run_dir: Path, change) -> None:
    entries = read_jsonl(run_dir / "ledger.jsonl")
    change(entries)
    (run_dir / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


@pytest.mark.parametrize("privacy", ["distributed", "user"])
def test_an_honest_secure_ledger_passes_and_the_audit_states_three_figures_by_threat(tmp_path, privacy):
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=2, participation=[SIX, SIX], privacy=privacy, t_min=5,
                     colluders=1)
    result = audit_run(tmp_path / "run")
    assert result["verdict"] == "pass", result["flags"]
    assert not codes(result, "warning") and result["max_relative_diff"] < 1e-3
    assert result["threats"] == THREATS == SUMMARY_THREATS
    unit = "user_level" if privacy == "user" else "record_level"
    block = result["figures"][unit]
    assert result["figures"]["unit"] == unit and set(block) == set(FIGURES)
    assert [block[name]["threat"] for name in FIGURES] == list(THREATS.values())
    assert block["malicious"]["budget"] == result["budget"] and block["own_share"]["budget"] is None
    for name in FIGURES:  # every figure recomputed from the ledger agrees with what the devices reported
        assert block[name]["epsilon_max_recomputed"] == pytest.approx(block[name]["epsilon_max_reported"], rel=1e-3)
    secure = result["secure_aggregation"]
    assert (secure["t_min"], secure["colluders"], secure["mismatches"]) == ([5, 5], [1, 1], 0)
    assert secure["epsilon_max_subverted_recomputed"] == block["own_share"]["epsilon_max_recomputed"]
    assert result["epsilon_max_recomputed"] == block["malicious"]["epsilon_max_recomputed"]  # the headline
    if privacy == "user":  # the record level is recomputed too, at twice the sensitivity
        assert result["figures"]["record_level"]["malicious"]["epsilon_max_recomputed"] > \
            block["malicious"]["epsilon_max_recomputed"]


@pytest.mark.parametrize("saw", [(100, 10), (3, 0)], ids=["device saw a larger t", "device saw a smaller t"])
def test_a_ledger_whose_t_min_disagrees_with_a_device_fails(tmp_path, saw):
    """Issue 17, item 4: the device accounted with the t it saw; the ledger's t_min said otherwise. The audit
    recomputes the device's figures from what it saw and fails with a named flag, whichever way they differ."""
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=2, participation=[SIX, SIX], privacy="distributed",
                     t_min=8, colluders=1, seen=lambda rnd, device: saw if (rnd, device) == (2, "d0") else None)
    result = audit_run(tmp_path / "run")
    assert result["verdict"] == "fail"
    mismatch = [f for f in result["flags"] if f["code"] == "secure_sum_mismatch"]
    assert [(f["severity"], f["device"], f["round"]) for f in mismatch] == [("error", "d0", 2)]
    assert f"t = {saw[0]}, c = {saw[1]}" in mismatch[0]["message"] and "t_min = 8" in mismatch[0]["message"]
    assert codes(result, "error") == {"secure_sum_mismatch"}  # its reports agree with what it saw: no other error
    d0, d1 = figures(result, "d0"), figures(result, "d1")  # d1: same releases, accounted with the ledger's (8, 1)
    for name in FIGURES:
        assert d0[name]["recomputed"] == pytest.approx(d0[name]["reported"], rel=1e-3)
    larger = saw[0] - saw[1] > 8 - 1
    assert (d0["own_share"]["recomputed"] > d1["own_share"]["recomputed"]) == larger
    assert d0["malicious"]["recomputed"] == pytest.approx(d1["malicious"]["recomputed"])  # the full noise either way
    assert result["secure_aggregation"]["mismatches"] == 1


def test_the_ledger_rewritten_to_a_smaller_t_min_cannot_hide_the_own_share_figure(tmp_path):
    """The server wrote t_min = 8 in both ledger lines after sending t = 100: the devices' reports give it away, and
    the own-share figure the audit states is the one the devices' view implies, not the ledger's."""
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=1, participation=[SIX], privacy="distributed", t_min=100,
                     colluders=10)
    honest = audit_run(tmp_path / "run")

    def lie(entries):
        sent, done = entries
        sent["t_min"], sent["colluders"] = 8, 1
        done["secure_sum"]["t_min"], done["secure_sum"]["colluders"] = 8, 1

    rewrite(tmp_path / "run", lie)
    result = audit_run(tmp_path / "run")
    assert result["verdict"] == "fail" and "secure_sum_mismatch" in codes(result, "error")
    assert {f["device"] for f in result["flags"] if f["code"] == "secure_sum_mismatch"} == {f"d{k}" for k in SIX}
    assert result["secure_aggregation"]["epsilon_max_subverted_recomputed"] == \
        pytest.approx(honest["secure_aggregation"]["epsilon_max_subverted_recomputed"])


def test_a_secure_round_without_a_threshold_or_with_a_device_outside_any_sum_fails(tmp_path):
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=1, participation=[SIX], privacy="distributed", t_min=5,
                     colluders=1)

    def drop(entries):
        for entry in entries:
            entry.pop("t_min", None)
            entry.pop("secure_sum", None)

    rewrite(tmp_path / "run", drop)
    result = audit_run(tmp_path / "run")
    assert result["verdict"] == "fail" and {"secure_sum_unrecorded", "secure_sum_mismatch"} <= codes(result, "error")


def test_a_round_no_device_confirmed_is_charged_at_the_ledgers_sum_and_flagged_unverified(tmp_path):
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=2, participation=[SIX, SIX], privacy="distributed", t_min=5,
                     colluders=1)
    honest = audit_run(tmp_path / "run")

    def unreported(entries):  # a ledger from before devices named their (t, c)
        for entry in entries:
            entry.pop("secure_sum_seen", None)

    rewrite(tmp_path / "run", unreported)
    result = audit_run(tmp_path / "run")
    assert result["verdict"] == "pass" and codes(result, "warning") == {"secure_sum_unverified"}
    assert result["secure_aggregation"]["unverified_rounds"] == 2
    assert result["figures"] == honest["figures"]


@pytest.mark.parametrize("privacy", ["local", "distributed", "user"])
def test_rejected_failed_and_unfinished_steps_count_in_every_figure(tmp_path, privacy):
    """d6's reply was rejected and d7's lost in round 1, each after training as d0..d5 did; round 2 was written
    ahead, trained by d0..d4, and never completed. Each is charged in every figure (and unit), as much as a release
    the server received."""
    secure = {} if privacy == "local" else {"t_min": 5, "colluders": 1}
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=1, participation=[SIX], privacy=privacy,
                     rejected={1: [6]}, failed={1: [7]}, unfinished=[0, 1, 2, 3, 4], **secure)
    result = audit_run(tmp_path / "run")
    assert result["verdict"] == "pass", result["flags"]
    units = ["record_level", "user_level"] if privacy == "user" else ["record_level"]
    for unit in units:
        once = figures(result, "d5", unit)  # one release, received
        for name in FIGURES:
            for device in ("d6", "d7"):
                row = figures(result, device, unit)[name]
                assert row["recomputed"] == 0.0 and row["charged"] == pytest.approx(once[name]["recomputed"])
            d0 = figures(result, "d0", unit)[name]
            assert d0["recomputed"] == pytest.approx(once[name]["recomputed"]) and d0["charged"] > d0["recomputed"]
            assert result["figures"][unit][name]["epsilon_max_charged"] == pytest.approx(d0["charged"])
    if privacy != "local":
        secure_block = result["secure_aggregation"]
        for name in ("honest", "malicious", "subverted"):
            assert secure_block[f"epsilon_max_{name}_charged"] > secure_block[f"epsilon_max_{name}_recomputed"]


def test_an_unseen_release_is_charged_at_the_worst_sum_any_party_named(tmp_path):
    """d7's reply was lost: it never said which (t, c) it accounted with. The ledger says (40, 10) but d0 reports
    (2, 0) (flagged): d7 is charged, figure by figure, at the worse of the two: own share 1/30 of the noise variance
    (the ledger's), honest all of it (d0's: no colluders)."""
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=1, participation=[SIX], privacy="distributed", t_min=40,
                     colluders=10, failed={1: [7]}, seen=lambda rnd, device: (2, 0) if device == "d0" else None)
    result = audit_run(tmp_path / "run")
    assert "secure_sum_mismatch" in codes(result, "error")
    d7, d0, d1 = (figures(result, d) for d in ("d7", "d0", "d1"))  # d1 accounted with the ledger's (40, 10)
    assert d7["own_share"]["charged"] == pytest.approx(d1["own_share"]["recomputed"])
    assert d7["honest"]["charged"] == pytest.approx(d0["honest"]["recomputed"])
    assert d1["own_share"]["recomputed"] > d0["own_share"]["recomputed"] and \
        d0["honest"]["recomputed"] > d1["honest"]["recomputed"]  # neither sum is the worse for both figures
    assert result["per_device"]["d7"]["secure_sums"][0]["t"] == [40, 2]


@pytest.mark.parametrize("privacy,colluders", [("distributed", 0), ("distributed", 1), ("distributed", 4),
                                               ("user", 0), ("user", 2)])
def test_the_figures_are_ordered_honest_malicious_own_share(tmp_path, privacy, colluders):
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=2, participation=[SIX, [0, 1, 2]], privacy=privacy,
                     t_min=6, colluders=colluders, failed={2: [5]})
    result = audit_run(tmp_path / "run")
    assert result["verdict"] == "pass", result["flags"]
    for device in result["per_device"]:
        for unit in result["per_device"][device]["figures"]:
            rows = figures(result, device, unit)
            for what in ("recomputed", "charged"):
                honest, malicious, own = (rows[name][what] for name in FIGURES)
                assert honest <= malicious * (1 + 1e-9) and malicious < own
                if colluders == 0:  # no colluder's share to strip: honest and malicious see the same noise
                    assert honest == pytest.approx(malicious)
                else:
                    assert honest < malicious


def test_the_three_figures_are_equal_in_the_local_mode(tmp_path):
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=2, participation=[SIX, [0, 1]], rejected={2: [2]})
    result = audit_run(tmp_path / "run")
    assert result["verdict"] == "pass" and "secure_aggregation" not in result
    for device in result["per_device"]:
        rows = figures(result, device)
        for what in ("recomputed", "charged"):
            assert rows["honest"][what] == rows["malicious"][what] == rows["own_share"][what]


@pytest.mark.parametrize("figure", ["epsilon_honest_reported", "epsilon_subverted_reported", "epsilon_reported"])
def test_under_reporting_any_figure_fails_with_its_own_flag(tmp_path, figure):
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=2, participation=[SIX, SIX], privacy="distributed",
                     t_min=5, colluders=1)

    def lower(entries):
        entries[-1][figure]["d3"] *= 0.7

    rewrite(tmp_path / "run", lower)
    result = audit_run(tmp_path / "run")
    code = {"epsilon_honest_reported": "honest_epsilon_under_reported",
            "epsilon_subverted_reported": "subverted_epsilon_under_reported",
            "epsilon_reported": "epsilon_under_reported"}[figure]
    assert result["verdict"] == "fail"
    assert [(f["code"], f["device"]) for f in result["flags"] if f["severity"] == "error"] == [(code, "d3")]


def test_over_reporting_the_own_share_figure_fails(tmp_path):
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=1, participation=[SIX], privacy="distributed", t_min=5,
                     colluders=1)

    def inflate(entries):
        entries[-1]["epsilon_subverted_reported"]["d1"] *= 3

    rewrite(tmp_path / "run", inflate)
    assert "subverted_epsilon_over_reported" in codes(audit_run(tmp_path / "run"), "error")


def test_own_share_far_above_the_budget_is_a_plain_words_warning(tmp_path):
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=1, participation=[SIX], privacy="distributed", t_min=200,
                     colluders=0, budget=5.0)
    result = audit_run(tmp_path / "run")
    assert result["verdict"] == "pass" and "own_share_far_above_budget" in codes(result, "warning")


def test_the_summary_states_the_three_figures_beside_each_other(tmp_path):
    config = write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=2, participation=[SIX, SIX],
                              privacy="distributed", t_min=5, colluders=1)
    privacy = privacy_summary(config, RunRecords(tmp_path / "run"), SIGMA, randomness=ServerRandomness.seeded(0))
    record = privacy["record_level"]
    assert record["epsilon_max_honest"] < record["epsilon_max_malicious"] == record["epsilon_max"] < \
        record["epsilon_max_subverted"]
    assert privacy["threats"] == {"epsilon_max_honest": THREATS["honest"],
                                  "epsilon_max_malicious": THREATS["malicious"],
                                  "epsilon_max_subverted": THREATS["own_share"]}
    audit = audit_run(tmp_path / "run")["secure_aggregation"]
    for name in ("honest", "malicious", "subverted"):
        assert audit[f"epsilon_max_{name}_recomputed"] == pytest.approx(record[f"epsilon_max_{name}"], rel=1e-3)


@pytest.mark.parametrize("second, repeated", [([3, 4, 5], False), ([2, 3, 4], True)])
def test_sums_of_one_round_over_disjoint_groups_are_not_a_repeated_round(tmp_path, second, repeated):
    # A secure popularity round is cut into sums over disjoint groups of devices, one attempt each: only an attempt
    # that asks a device again (a round re-run after a resume) is a repeat.
    write_honest_run(tmp_path / "run", sigma=SIGMA, rounds=2, participation=[[0, 1, 2], second],
                     privacy="distributed", t_min=2, colluders=0)

    def as_second_sum_of_round_one(entries: list[dict]) -> None:
        for entry in entries:
            if entry["round"] == 2:
                entry["round"], entry["attempt"] = 1, 1
    rewrite(tmp_path / "run", as_second_sum_of_round_one)
    assert ("round_repeated" in codes(audit_run(tmp_path / "run"))) is repeated

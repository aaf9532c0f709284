"""`fedrec bench` end to end on a tiny cell: the JSON it prints and writes is complete and consistent."""

from __future__ import annotations

import json
import math

import pytest

from fedrec.simulation.cli import main

POSITIVE = ("startup_s", "first_round_s", "flower_round_s", "plain_round_s", "ratio", "per_update_ms_flower",
            "per_update_ms_plain", "peak_rss_gb_flower", "peak_rss_gb_plain", "bytes_per_update_up",
            "bytes_per_request_down", "messages_up_per_round", "bytes_up_per_round")


def test_bench_tiny_cell(tmp_path, capsys):
    argv = ["bench", "--devices-per-round", "5", "--population", "20", "--items", "50", "--dim", "8", "--dp",
            "--rounds", "2", "--json", "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    (row,) = json.loads((tmp_path / "bench.json").read_text())
    assert printed == [row]
    assert (row["devices_per_round"], row["population"], row["items"], row["dim"], row["dp"], row["engine"],
            row["rounds"]) == (5, 20, 50, 8, True, "cohort", 2)
    for key in POSITIVE:
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    assert row["ratio"] == pytest.approx(row["flower_round_s"] / row["plain_round_s"], rel=1e-12)
    assert row["bytes_per_update_up"] == row["bytes_per_request_down"] == 4 * 50 * (8 + 1)
    assert 0 < row["trained_per_round"] <= 5
    assert row["per_update_ms_flower"] == pytest.approx(1000 * row["flower_round_s"] / row["trained_per_round"])
    assert row["peak_rss_gb_flower"] > row["peak_rss_gb_plain"]  # Ray's processes are counted


@pytest.mark.parametrize("argv, named", [(["--rounds", "1"], "--rounds 1"),
                                         (["--population", "3", "--devices-per-round", "5"], "--population 3"),
                                         (["--items", "5"], "--items 5"),
                                         (["--grid", "--no-dp"], "--no-dp")])
def test_bench_bad_flags_are_named(argv, named, capsys):
    assert main(["bench", *argv]) == 2
    assert named in capsys.readouterr().err

"""`fedrec bench` end to end on a tiny cell: the JSON it prints and writes is complete and consistent."""

from __future__ import annotations

import json
import math

import pytest

from fedrec.simulation.cli import main

POSITIVE = ("startup_s", "first_round_s", "flower_round_s", "plain_round_s", "ratio", "per_update_ms_flower",
            "per_update_ms_plain", "peak_rss_gb_flower", "peak_rss_gb_plain", "bytes_per_update_up",
            "bytes_per_request_down", "messages_up_per_round", "bytes_up_per_round")


@pytest.mark.parametrize("mode_flags, privacy, word", [(["--dp"], "local", 4),
                                                       pytest.param(["--privacy", "distributed"], "distributed", 8,
                                                                    marks=pytest.mark.e2e)])
def test_bench_tiny_cell(tmp_path, capsys, mode_flags, privacy, word):
    argv = ["bench", "--devices-per-round", "5", "--population", "20", "--items", "50", "--dim", "8", *mode_flags,
            "--rounds", "2", "--json", "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    (row,) = json.loads((tmp_path / "bench.json").read_text())
    assert printed == [row]
    assert (row["devices_per_round"], row["population"], row["items"], row["dim"], row["privacy"], row["engine"],
            row["rounds"]) == (5, 20, 50, 8, privacy, "cohort", 2)
    for key in POSITIVE:
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    assert row["ratio"] == pytest.approx(row["flower_round_s"] / row["plain_round_s"], rel=1e-12)
    # local: the float32 item delta with its bias; distributed: the int64 grid vector of the embedding alone
    assert row["bytes_per_update_up"] == word * 50 * (8 + (1 if word == 4 else 0))
    assert row["bytes_per_request_down"] == 4 * 50 * (8 + 1)
    assert 0 < row["trained_per_round"] <= 5
    assert row["per_update_ms_flower"] == pytest.approx(1000 * row["flower_round_s"] / row["trained_per_round"])
    assert row["peak_rss_gb_flower"] > row["peak_rss_gb_plain"]  # Ray's processes are counted


@pytest.mark.parametrize("argv, named", [(["--rounds", "1"], "--rounds 1"),
                                         (["--population", "3", "--devices-per-round", "5"], "--population 3"),
                                         (["--items", "5"], "--items 5"),
                                         (["--grid", "--no-dp"], "--privacy none"),
                                         (["--no-dp", "--privacy", "user"], "--no-dp with --privacy user")])
def test_bench_bad_flags_are_named(argv, named, capsys):
    assert main(["bench", *argv]) == 2
    assert named in capsys.readouterr().err

"""`fedrec scale`: the grid of populations, cohorts, modes and budgets, its files, and resuming an interrupted grid."""

from __future__ import annotations

import csv
import json

import pytest

from fedrec.shared.config import ConfigError, RunConfig
from fedrec.shared.policy import simulated_policy
from fedrec.simulation.cli import main as fedrec
from fedrec.simulation.scale import ScaleGrid, cohort_size, point_config

TINY = ["--items", "40", "--rounds", "2", "--devices-per-round", "10",
        "--run-config", "synthetic-topics=4 embedding-dim=4 synthetic-mean-events=12"]


def test_grid_points_and_cohorts():
    grid = ScaleGrid(populations=(100, 1000), cohorts=("default", "0.1"), modes=("user", "none"), epsilons=(1.0, 8.0))
    points = grid.points()
    assert len(points) == 2 * 2 * (2 + 1)  # 'none' runs once, without a budget
    assert (1000, "0.1", "none", None) in points and (100, "default", "user", 8.0) in points
    assert cohort_size("default", 1000, 100) == 100 and cohort_size("default", 50, 100) == 50
    assert cohort_size("0.1", 1000, 100) == 100 and cohort_size("0.1", 100_000, 100) == 10_000
    assert cohort_size("0.001", 100, 100) == 1


@pytest.mark.parametrize("grid, word", [
    (dict(populations=(1,), cohorts=("default",), modes=("user",), epsilons=(8.0,)), "--populations"),
    (dict(populations=(100,), cohorts=("half",), modes=("user",), epsilons=(8.0,)), "--cohorts"),
    (dict(populations=(100,), cohorts=("1.5",), modes=("user",), epsilons=(8.0,)), "--cohorts"),
    (dict(populations=(100,), cohorts=("default",), modes=("central",), epsilons=(8.0,)), "--modes"),
    (dict(populations=(100,), cohorts=("default",), modes=("user",), epsilons=(0.0,)), "--epsilons"),
    (dict(populations=(100,), cohorts=("default",), modes=("user",), epsilons=()), "--epsilons"),
])
def test_bad_grids_are_refused_naming_the_flag(grid, word):
    with pytest.raises(ConfigError, match=word):
        ScaleGrid(**grid)


def test_a_large_secure_cohort_raises_the_devices_cap_on_t():
    base = RunConfig(devices_per_round=100)
    small = point_config(base, 1000, "0.1", "user", 8.0)
    assert small.devices_per_round == 100 and "max-aggregation-threshold" not in small.device_policy
    large = point_config(base, 10_000, "0.1", "distributed", 4.0)
    assert large.devices_per_round == 1000 and large.epsilon_budget == 4.0 and large.privacy == "distributed"
    assert simulated_policy(large).max_aggregation_threshold == 800  # t = ceil(0.8 x 1000)
    assert "max-aggregation-threshold" not in point_config(base, 10_000, "0.1", "local", 4.0).device_policy
    assert not point_config(base, 10_000, "default", "none", None).dp


def test_scale_writes_every_point_and_resumes(tmp_path, capsys):
    out = tmp_path / "scale"
    args = ["scale", "--out", str(out), "--populations", "30,60", "--cohorts", "default,0.5", "--modes",
            "user,local,none", "--epsilons", "8", *TINY]
    assert fedrec(args) == 0
    rows = list(csv.DictReader(open(out / "scale.csv")))
    assert len(rows) == 2 * 2 * 3
    assert {(r["devices"], r["cohort"], r["devices_per_round"]) for r in rows} == {
        ("30", "default", "10"), ("30", "0.5", "15"), ("60", "default", "10"), ("60", "0.5", "30")}
    for row in rows:
        assert 0.0 <= float(row["hr@10"]) <= 1.0 and 0.0 < float(row["popularity_hr@10"]) <= 1.0
        if row["mode"] == "none":
            assert row["epsilon"] == "" and row["epsilon_max"] == ""
        else:
            assert 0 < float(row["epsilon_max"]) <= 8.0 and float(row["trained_per_round"]) > 0
    meta = json.loads((out / "scale.json").read_text())["meta"]
    assert meta["populations"] == [30, 60] and meta["rounds"] == 2 and meta["items"] == 40
    assert (out / "scale.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "## user" in printed and "| 60 | 0.5 (30) | 8.0 |" in printed

    # The same command again runs nothing: every point is in scale.csv already. A larger grid runs only the new points.
    before = (out / "scale.csv").read_text()
    assert fedrec(args) == 0
    assert (out / "scale.csv").read_text() == before
    assert fedrec(["scale", "--out", str(out), "--populations", "30", "--cohorts", "default,0.5", "--modes", "user",
                   "--epsilons", "4", *TINY]) == 0
    rows = list(csv.DictReader(open(out / "scale.csv")))
    assert len(rows) == 12 + 2 and {r["epsilon"] for r in rows[12:]} == {"4.0"}
    assert "| 30 | default (10) | 4.0 |" in (out / "scale.md").read_text()
    assert "| 60 |" not in (out / "scale.md").read_text()  # the files describe the grid asked for
    # A share that gives the default cohort's size is the same run: copied, not run twice.
    assert fedrec(["scale", "--out", str(out), "--populations", "20", "--cohorts", "default,0.5", "--modes", "user",
                   "--epsilons", "4", *TINY]) == 0
    default, share = list(csv.DictReader(open(out / "scale.csv")))[-2:]
    assert (default["cohort"], share["cohort"]) == ("default", "0.5")
    assert {k: v for k, v in default.items() if k != "cohort"} == {k: v for k, v in share.items() if k != "cohort"}


def test_a_grid_folder_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "scale"
    args = ["scale", "--out", str(out), "--populations", "20", "--cohorts", "default", "--modes", "none"]
    assert fedrec([*args, *TINY]) == 0
    other = [*TINY[:1], "50", *TINY[2:]]  # --items 50 instead of 40
    assert fedrec([*args, *other]) == 2
    assert "synthetic-items: 40 -> 50" in capsys.readouterr().err
    assert len(list(csv.DictReader(open(out / "scale.csv")))) == 1


def test_scale_refuses_real_data(tmp_path, capsys):
    assert fedrec(["scale", "--out", str(tmp_path / "s"), "--run-config", "dataset=movielens data-path=x"]) == 2
    assert "only synthetic populations" in capsys.readouterr().err

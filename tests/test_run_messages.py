"""What a finished run says about itself: rounds that trained nobody (per round, at the end, in summary.json), the
devices actually asked per round, the running epsilon maximum, progress of the final evaluation, and its own log
file - through the Python API, which must not print Flower's deprecation notice either."""

from __future__ import annotations

import re

import pytest

from fedrec.simulation.api import simulate

pytestmark = pytest.mark.e2e  # one real simulation (Ray): about a minute on a loaded 2-core machine


def test_a_run_that_stops_training_says_so_and_keeps_its_log(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    # 6 devices, 80 asked per round; a fixed sigma the budget affords for two rounds only: rounds 3 and 4 train nobody
    result = simulate(devices=6, devices_per_round=80, rounds=4, noise_multiplier=1.0, epsilon_budget=9.0,
                      popularity_prior=False, synthetic_items=30, synthetic_topics=3, synthetic_mean_events=10,
                      embedding_dim=4, out_dir=str(tmp_path / "run"))
    summary, log = result.summary, (tmp_path / "run" / "fedrec.log").read_text()
    captured = capfd.readouterr()
    assert "deprecated" not in captured.err + captured.out  # the API path filters Flower's notice as the CLI does

    assert summary["devices_per_round"] == 6
    assert any("devices-per-round 80 is more than the 6 devices" in w for w in summary["warnings"])
    assert any(w.startswith("2 of 4 training rounds trained no device (rounds 3, 4)") for w in summary["warnings"])
    assert "federation: 6 devices, rounds 1..4, 6 per round" in log
    for r in (3, 4):
        assert f"round {r} trained no device (6 asked: 6 declined" in log
    assert "warning: 2 of 4 training rounds trained no device" in result.table()  # the closing lines

    # the running maximum over all devices, 3 significant digits: never down, and the final one is the summary's
    running = [float(v) for v in re.findall(r"epsilon max so far ([0-9.]+)", log)]
    assert len(running) == 4 and running == sorted(running)
    assert all(len(v.replace(".", "").lstrip("0")) <= 3 for v in re.findall(r"epsilon max so far ([0-9.]+)", log))
    assert running[-1] == pytest.approx(summary["privacy"]["record_level"]["epsilon_max"], rel=5e-3)

    assert "evaluation 4/4: central MF baseline" in log and "evaluation 4/4: done in" in log  # progress shown
    lines = log.splitlines()
    assert "\x1b" not in log and len(lines) == len(set(lines))  # no colour codes, no line twice
    assert lines[-1].endswith(f"summary written to {tmp_path / 'run' / 'summary.json'}")

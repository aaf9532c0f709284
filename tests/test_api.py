"""The Python API (`from fedrec.simulation import simulate, report, audit`) and the CLI built on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrec.shared.config import SYNTHETIC_DEVICES, ConfigError, RunConfig
from fedrec.shared.data.population import simulated_device_count
from fedrec.simulation import Result, audit, load, run_config, simulate
from fedrec.simulation.cli import main


def test_run_config_takes_a_config_a_mapping_and_keywords():
    assert run_config(rounds=7, devices_per_round=3) == RunConfig(rounds=7, devices_per_round=3)
    assert run_config({"devices-per-round": 3}, rounds=7) == RunConfig(rounds=7, devices_per_round=3)
    assert run_config(RunConfig(rounds=7), seed=1) == RunConfig(rounds=7, seed=1)
    no_dp = run_config(no_dp=True)
    assert not no_dp.dp and "allow-no-dp=true" in no_dp.device_policy  # as fedrec simulate --no-dp
    with pytest.raises(ConfigError, match="roundz"):
        run_config(roundz=3)
    with pytest.raises(ConfigError, match="resume needs out-dir"):
        run_config(resume=True)


def test_default_devices_synthetic_population_or_every_device_of_real_data(tmp_path):
    assert RunConfig().devices == RunConfig(dataset="counts", data_path=str(tmp_path)).devices == 0
    assert simulated_device_count(RunConfig()) == SYNTHETIC_DEVICES == 500
    assert simulated_device_count(RunConfig(devices=40)) == 40


def test_simulate_returns_the_summary_the_metrics_and_the_run_dir(small_config):
    result = simulate(small_config, baselines=False, rounds=2)
    assert isinstance(result, Result) and result.run_dir == Path(small_config.out_dir).resolve()
    assert result.summary == json.loads((result.run_dir / "summary.json").read_text())
    assert result.summary["rounds"] == 2 and result.summary["devices"] == 12
    train = result.metrics[result.metrics["kind"] == "train"]
    assert list(train["round"]) == [1, 2] and (train["epsilon_max_reported"] > 0).all()
    assert {"trained", "declined", "seconds", "mean_delta_norm"} <= set(result.metrics.columns)
    assert result.config.rounds == 2 and result.data_set_devices is None
    assert result.table().startswith("synthetic: 12 devices,")
    again = load(result.run_dir)
    assert again.summary == result.summary and again.metrics.equals(result.metrics)
    verdict = audit(result.run_dir)
    assert verdict["verdict"] == "pass" and (result.run_dir / "audit" / "audit.json").exists()


def test_real_data_uses_all_its_devices_and_the_header_says_so(tmp_path, capsys):
    """`fedrec simulate` (the CLI, through the API) on a real data set without --devices: every device."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "user_artists.dat").write_text("userID\tartistID\tweight\n" + "".join(
        f"{u}\t{(7 * u + 3 * j) % 40 + 1}\t{u + j}\n" for u in range(1, 31) for j in range(8)))
    code = main(["simulate", "--dataset", "counts", "--data-path", str(raw), "--rounds", "1",
                 "--devices-per-round", "5", "--out", str(tmp_path / "run"), "--run-config",
                 "embedding-dim=4 num-negatives=4 eval-devices=5 baselines=false"])
    assert code == 0
    assert "counts: 30 of 30 devices," in capsys.readouterr().out  # the original source, not its prepared copy
    assert load(tmp_path / "run").data_set_devices == 30

"""Run configuration: one source of defaults, strict parsing, errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedrec.shared.config import AUTO, ConfigError, RunConfig
from fedrec.simulation.cli import parse_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_the_dataclass():
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert doc["tool"]["flwr"]["app"]["config"] == RunConfig().to_mapping()


def test_round_trip_through_mapping():
    config = RunConfig(rounds=7, noise_multiplier=1.5, dp=False)
    assert RunConfig.from_mapping(config.to_mapping()) == config


def test_unknown_key_is_rejected_with_the_known_keys():
    with pytest.raises(ConfigError, match="unknown key.*'roundz'"):
        RunConfig.from_mapping({"roundz": 3})


@pytest.mark.parametrize("key,value,message", [
    ("rounds", 0, "rounds=0: must be >= 1"),
    ("rounds", "three", "rounds='three' is not a valid int"),
    ("sample-rate", 1.5, "sample-rate=1.5: must be <= 1"),
    ("delta", 0.0, "delta=0.0: must be > 0"),
    ("server-optimizer", "sgd", "expected one of"),
    ("noise-multiplier", "loud", "a number or 'auto'"),
    ("noise-multiplier", -1.0, "must be > 0"),
    ("dp", "maybe", "not a valid bool"),
    ("epsilon-budget", float("nan"), "not a valid float"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_mapping({key: value})


def test_strings_from_the_command_line_are_coerced():
    config = RunConfig.from_mapping({"rounds": "5", "dp": "false", "local-lr": "0.25", "noise-multiplier": "AUTO"})
    assert (config.rounds, config.dp, config.local_lr, config.noise_multiplier) == (5, False, 0.25, AUTO)


def test_real_data_needs_a_path():
    with pytest.raises(ConfigError, match="needs a data-path"):
        RunConfig(dataset="movielens")


def test_run_config_flag_reads_pairs_and_files(tmp_path):
    toml = tmp_path / "extra.toml"
    toml.write_text('[tool.flwr.app.config]\nlocal-lr = 0.3\nserver-optimizer = "fedadam"\n')
    parsed = parse_run_config(["rounds=4 dp=false", str(toml), 'dataset="synthetic"'])
    assert parsed == {"rounds": 4, "dp": False, "local-lr": 0.3, "server-optimizer": "fedadam",
                      "dataset": "synthetic"}
    with pytest.raises(ConfigError, match="neither a file nor key=value"):
        parse_run_config(["not-a-pair"])

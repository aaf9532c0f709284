"""Shared fixtures; Flower and Ray are kept off the network for every test."""

from __future__ import annotations

import os

for _key, _value in {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402

from shared.config import RunConfig  # noqa: E402


@pytest.fixture
def small_config(tmp_path) -> RunConfig:
    """A tiny synthetic federation that runs in seconds."""
    return RunConfig(devices=12, synthetic_items=40, synthetic_topics=4, synthetic_mean_events=12,
                     embedding_dim=4, num_negatives=4, rounds=3, devices_per_round=6, eval_every=2,
                     eval_devices=6, out_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"))

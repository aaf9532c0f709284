"""Shared fixtures; Flower and Ray are kept off the network for every test."""

from __future__ import annotations

import os

for _key, _value in {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}.items():
    os.environ.setdefault(_key, _value)

import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fedrec.shared.config import RunConfig  # noqa: E402
from fedrec.simulation import procs  # noqa: E402


@pytest.fixture
def small_config(tmp_path) -> RunConfig:
    """A tiny synthetic federation that runs in seconds."""
    return RunConfig(devices=12, synthetic_items=40, synthetic_topics=4, synthetic_mean_events=12,
                     embedding_dim=4, num_negatives=4, rounds=3, devices_per_round=6, eval_every=2,
                     eval_devices=6, out_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state"))


@pytest.fixture(autouse=True)
def thawed_heap():
    """A deployed handler called in this process freezes the heap for its exit (client/app.py); thaw it after."""
    yield
    gc.unfreeze()


@pytest.fixture
def server_process_identity(monkeypatch):
    """A ServerApp's messages carry its run id, which Flower sets in the server process; the test is that process."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def ray_processes() -> dict[int, str]:
    """Ray daemons and workers that are ours: descendants of this process, or orphans (parent 1)."""
    parent_of = procs.parents()
    ours = procs.with_descendants([os.getpid()], parent_of) | {pid for pid, ppid in parent_of.items() if ppid == 1}
    found = {pid: procs.command_line(pid) for pid in ours}
    return {pid: args for pid, args in found.items() if any(tag in args for tag in procs.RAY_TAGS)}


def wait_until_gone(started: set[int], timeout: float = 20.0) -> dict[int, str]:
    """Our Ray processes that appeared after `started` was taken and are still there after `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := {p: a for p, a in ray_processes().items() if p not in started}) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One small simulation through the real Flower app (cohort engine: 3 nodes of 8 devices), shared by the tests
    that read its run directory."""
    from fedrec.simulation.runner import simulate

    root = tmp_path_factory.mktemp("e2e")
    before = set(ray_processes())  # other Ray sessions on this machine are not ours to judge
    config = RunConfig(devices=24, synthetic_items=60, synthetic_topics=4, synthetic_mean_events=12,
                       embedding_dim=4, num_negatives=4, rounds=3, devices_per_round=8, eval_every=2,
                       eval_devices=8, epsilon_budget=4.0, simulation_shards=3, federated_eval=True,
                       out_dir=str(root / "run"))
    summary = simulate(config)
    return config, summary, Path(config.out_dir), before



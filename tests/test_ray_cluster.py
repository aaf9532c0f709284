"""`ray-address`: the simulation attaches to a Ray cluster someone else started (a head on loopback here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from fedrec.shared.config import RunConfig
from fedrec.simulation import procs
from fedrec.simulation.procs import free_port, processes_mentioning

pytestmark = pytest.mark.e2e  # a Ray head and a simulation attached to it


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with its own temp dir; afterwards every process of it is stopped by PID."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray is None:
        pytest.fail("the 'ray' command (installed with flwr[simulation]) is missing")
    temp_dir = Path("/tmp") / f"fedrec-ray-{os.getpid()}-{free_port()}"  # short: Ray's socket paths are limited
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                        "--disable-usage-stats", "--temp-dir", str(temp_dir)],
                       check=True, env=env, capture_output=True, text=True, timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        started = processes_mentioning(str(temp_dir), descendants=True)  # workers rename themselves 'ray::...'
        left = procs.stop(started, grace=15) + processes_mentioning(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray head processes still running: {left}"


def raylets(temp_dir_prefix: str, *, inside: bool) -> set[int]:
    """Raylet daemons whose command line does (inside) or does not name the head's temp dir.

    Name and command line are read in one snapshot per process: a Ray worker's command line also
    mentions "raylet" (its socket path) until it renames itself, so two separate scans could
    misclassify it.
    """
    found = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if proc.info["name"] == "raylet" and (temp_dir_prefix in cmdline) == inside:
            found.add(proc.pid)
    return found


def test_simulation_attaches_to_a_running_ray_cluster(ray_head, tmp_path):
    from fedrec.simulation.runner import simulate

    config = RunConfig(devices=12, synthetic_items=40, synthetic_topics=4, synthetic_mean_events=12,
                       embedding_dim=4, num_negatives=4, rounds=2, devices_per_round=6, eval_every=2,
                       eval_devices=6, baselines=False, federated_eval=True, ray_address=ray_head,
                       out_dir=str(tmp_path / "run"))
    assert raylets("fedrec-ray-", inside=True), "the detector does not see the head's own raylet"
    before = raylets("fedrec-ray-", inside=False)
    private_raylets: set[int] = set()
    done = threading.Event()

    def watch() -> None:  # a raylet outside the head would mean the simulation started its own Ray
        while not done.wait(0.2):
            private_raylets.update(raylets("fedrec-ray-", inside=False) - before)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = simulate(config)
    finally:
        done.set()
        watcher.join()
    assert summary["devices"] == 12 and summary["federated_eval"]["devices"] == 12
    assert not private_raylets, "the simulation started a Ray instance of its own"

"""`flwr run .` on a local simulation SuperLink, isolated: its own FLWR_HOME, no remote connection, stopped after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedrec.simulation import procs

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
LOCAL_ONLY = '[superlink]\ndefault = "local-simulation"\n\n[superlink.local-simulation]\naddress = ":local:"\n'


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions `text`, with all their descendants (the SuperLink's executor)."""
    return procs.processes_mentioning(text, descendants=True)


def test_flwr_run_on_local_simulation(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(LOCAL_ONLY)  # only a local connection exists to be chosen
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    run_dir = tmp_path / "run"
    flwr = Path(sys.executable).with_name("flwr")
    command = [str(flwr), "run", str(ROOT), "local-simulation", "--stream",
               "--run-config", f'devices=8 rounds=2 devices-per-round=4 synthetic-items=60 embedding-dim=4 '
                               f'out-dir="{run_dir}"',
               "--federation-config", "num-supernodes=8"]
    try:
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert (run_dir / "summary.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["devices"] == 8 and summary["rounds"] == 2 and summary["dp"] is True
        ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
        assert [e["round"] for e in ledger if e["status"] == "done"] == [0, 1, 2]
        # Under flwr run the simulated devices keep their state in Flower's Context, which a new run starts
        # empty: a resume would hand every device a fresh budget, so the server refuses it.
        resume = [*command[:6], command[6].replace("rounds=2", "rounds=3") + " resume=true", *command[7:]]
        refused = subprocess.run(resume, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert "device state is not durable" in refused.stdout + refused.stderr, refused.stdout[-3000:]
        assert len((run_dir / "ledger.jsonl").read_text().splitlines()) == len(ledger)  # nothing was sent
    finally:
        # `flwr run` leaves its local SuperLink running in the background: stop it (and its executor) by PID.
        procs.stop(processes_mentioning(str(home)))
        assert processes_mentioning(str(home)) == []

"""A real deployment on loopback: SuperLink with TLS and SuperNode authentication, one SuperNode per device."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from shared.config import RunConfig
from simulation.cli import main
from simulation.deploy import LocalDeployment, deploy_local

pytestmark = pytest.mark.e2e
TINY = dict(synthetic_items=60, synthetic_topics=4, synthetic_mean_events=12, embedding_dim=4, num_negatives=4,
            eval_every=2)


def processes_mentioning(text: str) -> list[int]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if text in line and "pytest" not in line]


def test_deploy_local_runs_a_federation_of_supernodes_and_stops_them(tmp_path, capsys):
    out = tmp_path / "deploy"
    summary = deploy_local(RunConfig(devices=3, rounds=2, devices_per_round=3, **TINY), out)
    assert summary["devices"] == 3 and summary["rounds"] == 2 and summary["dp"] is True
    ledger = [json.loads(line) for line in (out / "run" / "ledger.jsonl").read_text().splitlines()]
    assert [entry["round"] for entry in ledger] == [0, 1, 2]
    assert all(sorted(entry["trained"]) == ["0", "1", "2"] for entry in ledger)
    assert 0 < summary["privacy"]["record_level"]["epsilon_max"] <= 8.0
    for device in ("0", "1", "2"):  # each device's state and latest model live with the device, not the server
        assert {p.name for p in (out / "devices" / device).iterdir()} >= {"state.json", "item-model.npz"}
    assert main(["recommend", "--state-path", str(out / "devices" / "0"), "--catalogue",
                 str(out / "data" / "catalogue.csv"), "-k", "3"]) == 0
    assert capsys.readouterr().out.count("[item ") == 3
    time.sleep(1)
    assert processes_mentioning(str(out)) == []


def test_a_supernode_without_a_registered_key_is_refused(tmp_path):
    with LocalDeployment(tmp_path / "deploy") as deployment:
        deployment.start_superlink()
        private, _ = deployment.node_keys("stranger")  # created, never registered
        node = deployment.start_supernode("stranger", private, {"data-path": "unused", "catalogue-path": "unused",
                                                                "state-path": str(tmp_path / "state")})
        assert node.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "deploy" / "logs" / "stranger.log").read_text()
    assert processes_mentioning(str(tmp_path / "deploy")) == []

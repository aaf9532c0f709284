"""A real deployment on loopback: SuperLink with TLS and SuperNode authentication, one SuperNode per device."""

from __future__ import annotations

import json
import time

import pytest

from fedrec.shared.config import RunConfig
from fedrec.simulation.cli import main
from fedrec.simulation.deploy import LocalDeployment, deploy_local
from fedrec.simulation.procs import processes_mentioning

pytestmark = pytest.mark.e2e
TINY = dict(synthetic_items=60, synthetic_topics=4, synthetic_mean_events=12, embedding_dim=4, num_negatives=4,
            eval_every=2)


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


def test_a_killed_supernode_fails_its_round_and_rejoins_with_its_epsilon(tmp_path):
    """Device 2's SuperNode is killed after round 1: round 2 completes without it (round timeout); restarted
    with the same key and state folder, it rejoins a later round and its epsilon continues from round 1."""
    import signal
    import threading

    from fedrec.simulation.deploy import device_files, server_run_config, start_devices

    out = (tmp_path / "deploy").resolve()
    config = RunConfig(devices=3, rounds=5, devices_per_round=3, round_timeout=40.0, epsilon_budget=30.0,
                       **{**TINY, "eval_every": 5})
    data, files = device_files(config, out)
    ledger = out / "run" / "ledger.jsonl"

    def rounds_done() -> list[dict]:
        return [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []

    def wait_for_round(server_round: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e["round"] == server_round for e in rounds_done()):
            assert time.monotonic() < deadline, f"round {server_round} did not finish"
            time.sleep(0.5)

    with LocalDeployment(out) as deployment:
        deployment.start_superlink()
        nodes = start_devices(deployment, data, files)
        run = threading.Thread(target=deployment.run, args=(server_run_config(config, data, 3, out / "run"),),
                               kwargs={"timeout": 600})
        run.start()
        wait_for_round(1)
        deployment.stop("supernode-2", sig=signal.SIGKILL)
        wait_for_round(2)
        deployment.restart_supernode("supernode-2", *nodes["supernode-2"])
        run.join(timeout=600)
    entries = {e["round"]: e for e in rounds_done()}
    assert entries[1]["trained"] == ["0", "1", "2"]
    assert "2" in entries[2]["failed"] and entries[2]["trained"] == ["0", "1"]
    rejoined = [r for r in (3, 4, 5) if "2" in entries[r]["trained"]]
    assert rejoined, {r: entries[r]["failed"] for r in (3, 4, 5)}
    assert entries[rejoined[0]]["epsilon_reported"]["2"] > entries[1]["epsilon_reported"]["2"] > 0
    assert json.loads((out / "run" / "summary.json").read_text())["rounds"] == 5
    assert processes_mentioning(str(out)) == []


def test_the_superlink_restarted_resumes_the_run_from_its_checkpoint(tmp_path):
    """The SuperLink (and with it the ServerApp) is stopped after round 2 and started again on the same
    database; `flwr run` with resume=true continues from the checkpoint, appending to the same ledger."""
    import threading

    from fedrec.simulation.deploy import device_files, server_run_config, start_devices

    out = (tmp_path / "deploy").resolve()
    config = RunConfig(devices=3, rounds=4, devices_per_round=3, round_timeout=60.0, epsilon_budget=30.0,
                       **{**TINY, "eval_every": 4})
    data, files = device_files(config, out)
    ledger = out / "run" / "ledger.jsonl"
    run_config = server_run_config(config, data, 3, out / "run")

    def rounds_done() -> list[int]:
        return [json.loads(line)["round"] for line in ledger.read_text().splitlines()] if ledger.exists() else []

    with LocalDeployment(out) as deployment:
        deployment.start_superlink()
        start_devices(deployment, data, files)
        first = threading.Thread(target=deployment.run, args=(run_config,), kwargs={"timeout": 600})
        first.start()
        deadline = time.monotonic() + 300
        while 2 not in rounds_done():
            assert time.monotonic() < deadline, "round 2 did not finish"
            time.sleep(0.5)
        deployment.stop("superlink")
        first.join(timeout=120)
        deployment.start_superlink()
        deployment.run({**run_config, "resume": True}, timeout=600)
    done = rounds_done()
    assert done[:3] == [0, 1, 2] and done[-2:] == [3, 4] and sorted(set(done)) == [0, 1, 2, 3, 4]
    assert len(done) <= 6  # at most the round in flight when the SuperLink stopped is run again
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["federated_eval"]["devices"] == 3
    reported = [eps for line in ledger.read_text().splitlines() for eps in json.loads(line)["epsilon_reported"].values()]
    assert max(reported) <= config.epsilon_budget  # a lost round costs budget, never more than the budget
    assert processes_mentioning(str(out)) == []

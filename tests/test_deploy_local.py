"""A real deployment on loopback: SuperLink with TLS and SuperNode authentication, one SuperNode per device."""

from __future__ import annotations

import json
import time

import pytest

from fedrec.shared.config import RunConfig
from fedrec.shared.policy import simulated_policy
from fedrec.shared.data.prepared import SERVER_MANIFEST_KEYS
from fedrec.simulation.cli import main
from fedrec.simulation.deploy import LocalDeployment, deploy_local
from fedrec.simulation.procs import processes_mentioning

pytestmark = pytest.mark.e2e
TINY = dict(synthetic_items=60, synthetic_topics=4, synthetic_mean_events=12, embedding_dim=4, num_negatives=4,
            eval_every=2)
IDS = ["device-0", "device-1", "device-2"]  # deploy-local's device ids: 'device-<file stem>'
TINY_PAIRS = " ".join(f"{key.replace('_', '-')}={value}" for key, value in TINY.items())


def test_deploy_local_runs_a_federation_of_supernodes_and_stops_them(tmp_path, capsys):
    out = tmp_path / "deploy"
    assert main(["deploy-local", "--devices", "3", "--rounds", "2", "--out", str(out), "--run-config", TINY_PAIRS]) == 0
    printed = capsys.readouterr().out  # what a deployment can say: no central table of dashes
    assert printed.startswith("deployment: 3 devices said hello, 60 items, 2 rounds")
    assert "no central quality metrics" in printed and "federated-eval=true" in printed and "---" not in printed
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["devices"] == 3 and summary["rounds"] == 2 and summary["dp"] is True
    ledger = [json.loads(line) for line in (out / "run" / "ledger.jsonl").read_text().splitlines()]
    assert [(entry["round"], entry["status"]) for entry in ledger] == [(r, s) for r in (0, 1, 2) for s in ("sent", "done")]
    assert all(sorted(entry["trained"]) == IDS for entry in ledger if entry["status"] == "done")
    assert summary["metrics"]["hr@10"] is None and summary["federated_eval"] == {}  # nothing left a device unasked
    assert "OS entropy" in summary["privacy"]["server_randomness"]
    assert 0 < summary["privacy"]["record_level"]["epsilon_max"] <= 8.0
    for device in ("0", "1", "2"):  # each device's state and latest model live with the device, not the server
        assert {p.name for p in (out / "devices" / device).iterdir()} >= {"state.json", "item-model.npz"}
    assert main(["device", "recommend", "--state-path", str(out / "devices" / "0"), "--catalogue",
                 str(out / "data" / "catalogue.csv"), "-k", "3"]) == 0
    assert capsys.readouterr().out.count("[item ") == 3
    # each device was enrolled by the federation's authority, kept apart from the SuperLink's TLS files
    credentials = out / "credentials"
    assert {p.name for p in (credentials / "authority").iterdir()} == {"authority.key", "authority.pub"}
    assert not {p.name for p in (credentials / "tls").iterdir()} & {"authority.key", "authority.pub"}
    from fedrec.simulation.enrol import check_device

    pin = (credentials / "authority" / "authority.pub").read_text().strip()
    for stem in ("0", "1", "2"):
        device = credentials / "devices" / stem
        check_device(device / "device.key", device / "device.crt", pin, f"device-{stem}")
    assert main(["device", "status", "--state-path", str(out / "devices" / "1")]) == 0
    status = capsys.readouterr().out
    assert status.startswith("device device-1 (deployed") and "rounds joined: 3 (0-2)" in status
    time.sleep(1)
    assert processes_mentioning(str(out)) == []
    # The server was given its folder alone: the public catalogue and a manifest with nothing per device.
    server = out / "server"
    assert json.loads((out / "run" / "config.json").read_text())["data-path"] == str(server)
    assert sorted(p.relative_to(server).as_posix() for p in server.rglob("*")) == ["catalogue.csv", "manifest.json"]
    manifest = json.loads((server / "manifest.json").read_text())
    assert set(manifest) <= SERVER_MANIFEST_KEYS
    assert manifest["num_items"] == summary["items"] == TINY["synthetic_items"]
    # no all-device arrays or user-id map anywhere: each device's events exist only in its own file
    assert not [p for p in out.rglob("*") if p.suffix == ".npy" or p.name == "device_ids.csv"]
    assert sorted(p.name for p in (out / "data" / "devices").iterdir()) == ["0.csv", "1.csv", "2.csv"]


def test_deploy_local_runs_real_secure_aggregation_in_the_distributed_mode(tmp_path):
    """One SuperNode per device, TLS, authentication: every sum (popularity and each round) is decrypted from masked
    vectors only, and the audit recomputes both figures from the ledger."""
    from fedrec.server.audit import audit_run

    out = tmp_path / "deploy"
    summary = deploy_local(RunConfig(devices=3, rounds=1, devices_per_round=3, privacy="distributed", **TINY), out)
    privacy = summary["privacy"]
    assert (privacy["mode"], privacy["secure_aggregation"]) == ("distributed", "real")
    assert 0 < privacy["record_level"]["epsilon_max"] <= 8.0 < privacy["record_level"]["epsilon_max_subverted"]
    ledger = [json.loads(line) for line in (out / "run" / "ledger.jsonl").read_text().splitlines()]
    done = [entry for entry in ledger if entry["status"] == "done"]
    assert [(e["kind"], e["round"]) for e in done] == [("popularity", 0), ("train", 1)]
    assert all(e["secure_sum"] == {"aggregation": "real", "colluders": 1, "decrypted": True, "shares": 3,
                                  "t_min": 3} for e in done)
    assert audit_run(out / "run")["verdict"] == "pass"
    # the device's own view: its figures from its own state, a secure sum per round it joined, no refusal
    from fedrec.client.status import device_status

    status = device_status(state_path=out / "devices" / "0")
    assert status["device_id"] == "device-0" and len(status["secure_sums"]) == 2 and status["refused"] == {}
    assert status["record_level"]["malicious"] == pytest.approx(privacy["record_level"]["epsilon_max"], rel=1e-6)
    time.sleep(1)
    assert processes_mentioning(str(out)) == []


def test_a_supernode_without_a_registered_key_is_refused(tmp_path):
    with LocalDeployment(tmp_path / "deploy") as deployment:
        deployment.start_superlink()
        private, _ = deployment.node_keys("stranger")  # created, never registered
        node = deployment.start_supernode("stranger", private, {"data-path": "unused", "catalogue-path": "unused",
                                                                "state-path": str(tmp_path / "state"),
                                                                "device-id": "stranger"})
        assert node.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "deploy" / "logs" / "stranger.log").read_text()
    assert processes_mentioning(str(tmp_path / "deploy")) == []


def run_with_a_killed_supernode(config: RunConfig, out) -> list[dict]:
    """Run the app on `config`'s devices; SIGKILL supernode-2 after round 1 and restart it (same key and state
    folder) after round 2. Returns the ledger's outcome lines."""
    import signal
    import threading

    from fedrec.simulation.deploy import deployment_data, server_run_config, start_devices

    data = deployment_data(config, out)
    ledger = out / "run" / "ledger.jsonl"

    def rounds_done() -> list[dict]:
        lines = [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []
        return [e for e in lines if e["status"] == "done"]

    def wait_for_round(server_round: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e["round"] == server_round for e in rounds_done()):
            assert time.monotonic() < deadline, f"round {server_round} did not finish"
            time.sleep(0.5)

    with LocalDeployment(out) as deployment:
        deployment.start_superlink()
        nodes = start_devices(deployment, data, simulated_policy(config))
        run = threading.Thread(target=deployment.run, args=(server_run_config(config, data.server, out / "run"),),
                               kwargs={"timeout": 600})
        run.start()
        wait_for_round(1)
        deployment.stop("supernode-2", sig=signal.SIGKILL)
        wait_for_round(2)
        deployment.restart_supernode("supernode-2", *nodes["supernode-2"])
        run.join(timeout=600)
    return rounds_done()


def test_a_killed_supernode_fails_its_round_and_rejoins_with_its_epsilon(tmp_path):
    """Device 2's SuperNode is killed after round 1: round 2 completes without it (round timeout); restarted
    with the same key and state folder, it rejoins a later round and its epsilon continues from round 1."""
    out = (tmp_path / "deploy").resolve()
    config = RunConfig(devices=3, rounds=5, devices_per_round=3, round_timeout=40.0, epsilon_budget=30.0,
                       **{**TINY, "eval_every": 5})
    entries = {e["round"]: e for e in run_with_a_killed_supernode(config, out)}
    assert entries[1]["trained"] == IDS
    assert "device-2" in entries[2]["failed"] and entries[2]["trained"] == IDS[:2]
    rejoined = [r for r in (3, 4, 5) if "device-2" in entries[r]["trained"]]
    assert rejoined, {r: entries[r]["failed"] for r in (3, 4, 5)}
    assert entries[rejoined[0]]["epsilon_reported"]["device-2"] > entries[1]["epsilon_reported"]["device-2"] > 0
    assert json.loads((out / "run" / "summary.json").read_text())["rounds"] == 5
    assert processes_mentioning(str(out)) == []


def test_the_superlink_killed_mid_round_resumes_from_its_checkpoint_and_the_audit_charges_that_round(tmp_path):
    """The SuperLink (and with it the ServerApp) is killed while round 3 is in flight and started again on the
    same database; `flwr run` with resume=true continues from the checkpoint, appending to the same ledger,
    and the audit charges every device asked in the round that never completed."""
    import signal
    import threading

    from fedrec.server.audit import audit_run

    from fedrec.simulation.deploy import deployment_data, server_run_config, start_devices

    out = (tmp_path / "deploy").resolve()
    # min-devices 3: the restarted ServerApp waits for all three devices to say hello again before resuming
    config = RunConfig(devices=3, rounds=4, devices_per_round=3, round_timeout=60.0, epsilon_budget=30.0,
                       min_devices=3, federated_eval=True, **{**TINY, "eval_every": 4})
    data = deployment_data(config, out)
    ledger = out / "run" / "ledger.jsonl"
    run_config = server_run_config(config, data.server, out / "run")

    def lines() -> list[dict]:
        return [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []

    with LocalDeployment(out) as deployment:
        deployment.start_superlink()
        start_devices(deployment, data, simulated_policy(config))
        first = threading.Thread(target=deployment.run, args=(run_config,), kwargs={"timeout": 600})
        first.start()
        deadline = time.monotonic() + 300
        while not any(e["round"] == 3 and e["kind"] == "train" and e["status"] == "sent" for e in lines()):
            assert time.monotonic() < deadline, "round 3 was never sent"
            time.sleep(0.05)
        deployment.stop("superlink", sig=signal.SIGKILL)  # mid-round: its requests are out, its replies not in
        first.join(timeout=120)
        in_flight = [e for e in lines() if e["round"] == 3 and e["kind"] == "train"]
        deployment.start_superlink()
        deployment.run({**run_config, "resume": True}, timeout=600)
    assert [e["status"] for e in in_flight] == ["sent"], "round 3 finished before the SuperLink was killed"
    done = [e["round"] for e in lines() if e["status"] == "done" and e["kind"] == "train"]
    assert done == [1, 2, 3, 4]  # round 3 ran once more, as attempt 1, after the resume
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["federated_eval"]["devices"] == 3
    audit = audit_run(out / "run")
    assert "round_unfinished" in {f["code"] for f in audit["flags"]} and audit["verdict"] == "pass"
    for device in in_flight[0]["asked"]:  # charged for the lost attempt on top of what it released
        assert audit["per_device"][device]["charged_rdp"] > audit["per_device"][device]["recomputed_rdp"]
    # Devices enforce their budget on what they really spent; the charged figure is the audit's upper bound (the
    # lost attempt counted whether or not its requests reached them), so it may lie above the budget.
    reported = [row["reported"] for row in audit["per_device"].values() if row["reported"] is not None]
    assert max(reported) <= config.epsilon_budget
    assert processes_mentioning(str(out)) == []


def test_a_secure_round_missing_a_supernode_aborts_before_training_and_charges_nobody(tmp_path):
    """Distributed mode, t = 3 of 3: device 2's SuperNode is killed after round 1, so round 2's secure sum cannot be
    decrypted; it is aborted at the key stage, before anyone trains (the others' epsilon does not move). Once the
    server stops asking the dead node, a later round's sum is decrypted again (rejoining is the local-mode test's)."""
    from fedrec.server.audit import audit_run

    out = (tmp_path / "deploy").resolve()
    # five messages per secure sum: a stage must fit the round timeout on a loaded 2-core machine too
    config = RunConfig(devices=3, rounds=4, devices_per_round=3, round_timeout=60.0, epsilon_budget=30.0,
                       privacy="distributed", **{**TINY, "eval_every": 5})
    entries = {e["round"]: e for e in run_with_a_killed_supernode(config, out) if e["kind"] == "train"}
    assert entries[1]["secure_sum"]["decrypted"] and entries[1]["trained"] == IDS
    assert entries[2]["secure_sum"] == {"aggregation": "real", "colluders": 1, "decrypted": False, "shares": 0,
                                        "t_min": 3}
    assert entries[2]["trained"] == [] and "device-2" in entries[2]["failed"]
    for device in IDS[:2]:  # asked, answered the key stage, never trained: not charged
        assert entries[2]["epsilon_reported"][device] == entries[1]["epsilon_reported"][device]
    later = [entries[r] for r in (3, 4) if entries[r]["secure_sum"]["decrypted"]]
    assert later and all(e["secure_sum"]["shares"] == len(e["trained"]) >= e["secure_sum"]["t_min"] for e in later)
    audit = audit_run(out / "run")
    assert audit["verdict"] == "pass", [f for f in audit["flags"] if f["severity"] == "error"]
    assert processes_mentioning(str(out)) == []


def test_the_printed_commands_of_each_machine_run_a_deployment_on_loopback(tmp_path, capsys):
    """`deploy-local --print-commands` prints what the authority, the operator and each device run; executed line by
    line as printed (a line ending in '&' keeps running), they enrol, prepare each device's own log on the device,
    start the SuperLink and SuperNodes and finish the run."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "machines"
    assert main(["deploy-local", "--devices", "2", "--rounds", "1", "--out", str(out), "--print-commands",
                 "--run-config", TINY_PAIRS]) == 0
    script = capsys.readouterr().out
    commands = [line for line in script.splitlines() if line.strip() and not line.startswith("#")]
    assert not list(out.glob("*/events.csv"))  # printed, not run: each device prepares its own file when it runs them
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    running, printed = [], []
    try:
        for command in commands:
            if command.endswith("&"):
                with open(tmp_path / f"daemon-{len(running)}.log", "wb") as log_file:
                    running.append(subprocess.Popen(["bash", "-c", command[:-1]], env=env, cwd=tmp_path,
                                                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True))
                continue
            done = subprocess.run(["bash", "-c", command], env=env, cwd=tmp_path, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            printed.append(done.stdout)
    finally:
        for process in running:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    summary = json.loads((out / "operator" / "run" / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["devices"] == 2
    ledger = [json.loads(line) for line in (out / "operator" / "run" / "ledger.jsonl").read_text().splitlines()]
    assert all(sorted(e["trained"]) == ["device-0", "device-1"] for e in ledger if e["status"] == "done")
    assert printed[-2].startswith("device device-0 (deployed") and "rounds joined: 2 (0-1)" in printed[-2]
    assert printed[-1].count("[item ") == 5
    # every machine holds its own files only: the operator no device's log or events, a device no other's
    assert not [p for p in (out / "operator").rglob("*") if p.name in ("raw.csv", "events.csv", "state.json")]
    for device in ("device-0", "device-1"):
        assert {p.name for p in (out / device).iterdir()} >= {"raw.csv", "events.csv", "catalogue.csv", "state"}
        assert (out / device / "identity" / "device.key").stat().st_mode & 0o077 == 0
    assert not (out / "authority" / "issued" / "device-0" / "device.key").exists()  # the key never left the device
    time.sleep(1)
    assert processes_mentioning(str(out)) == []


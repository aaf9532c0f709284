"""`fedrec deploy-local --print-commands`: each machine's commands touch its own files and what it is sent, only.

(tests/test_deploy_local.py, marked e2e, executes the printed commands on loopback.)"""

from __future__ import annotations

from fedrec.shared.config import RunConfig
from fedrec.simulation.cli import main
from fedrec.simulation.recipe import deployment_recipe

TINY = RunConfig(devices=3, rounds=1, devices_per_round=3, synthetic_items=40, synthetic_topics=4,
                 synthetic_mean_events=12, embedding_dim=4)


def test_each_machine_runs_its_own_commands_and_only_public_files_reach_the_operator(tmp_path):
    out = (tmp_path / "recipe").resolve()
    steps = [s for s in deployment_recipe(TINY, out) if s.command]
    devices = [f"device-{k}" for k in range(3)]
    assert sorted(p.name for p in out.iterdir()) == ["device-0", "device-1", "device-2", "operator"]
    for device in devices:  # inputs: each device's own log in its own folder, nothing else of anyone's
        assert sorted(p.name for p in (out / device).iterdir()) == ["raw.csv"]
        others = [d for d in devices if d != device]
        for step in steps:
            if step.machine == device:
                assert not any(f"{out}/{other}/" in step.command for other in others), step.command
    for step in steps:
        if step.machine in ("operator", "authority"):
            assert "raw.csv" not in step.command and "events.csv" not in step.command, step.command
    # a device's log becomes its training file on the device, against the catalogue the operator built
    prepares = [s for s in steps if s.command.startswith("fedrec device prepare")]
    assert [s.machine for s in prepares] == devices
    assert [s.command for s in steps if s.command.startswith("fedrec catalogue")][0].startswith(
        f"fedrec catalogue --items {out}/operator/items.csv")
    # the private keys are made on the device; the authority certifies only the public key it was sent
    enrolments = [s.command for s in steps if s.command.startswith("fedrec enrol device")]
    assert len(enrolments) == 3 and all("--public-key" in c for c in enrolments)
    order = [s.command.split()[0:3] for s in steps]
    assert order.index(["fedrec", "enrol", "authority"]) < order.index(["fedrec", "device", "prepare"])
    long_running = [s for s in steps if s.command.endswith("&")]
    assert [s.machine for s in long_running] == ["operator", *devices]
    run = [s.command for s in steps if " flwr run " in s.command]
    assert len(run) == 1 and "min-devices=3" in run[0] and f'data-path="{out}/operator/server"' in run[0]


def test_print_commands_refuses_a_folder_that_holds_anything(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.csv").write_text("x")
    assert main(["deploy-local", "--devices", "2", "--out", str(tmp_path / "used"), "--print-commands"]) == 2
    assert "not empty" in capsys.readouterr().err

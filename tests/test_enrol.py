"""The operator's credentials (`fedrec enrol ...`) and the device owner's view (`fedrec device status`)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID
from flwr.app import Context, RecordDict

from fedrec.shared.config import RunConfig
from fedrec.shared.device import Device, DeviceSettings
from fedrec.shared.identity import Authority, DeviceIdentity, IdentityError, authority_key_from_hex, \
    verify_certificate
from fedrec.shared.policy import PrivacyPolicy
from fedrec.shared.state import FileStateStore, SlotStateStore
from fedrec.simulation.cli import main
from tests.helpers import plan


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def authority(tmp_path, capsys) -> tuple[Path, str]:
    code, out, _ = run(capsys, "enrol", "authority", "--out", str(tmp_path / "authority"))
    assert code == 0
    return tmp_path / "authority" / "authority.key", out


def pinned_hex(out: str) -> str:
    return out.strip().splitlines()[-1].split('"')[1]


# -- fedrec enrol authority ----------------------------------------------------------------------------------
def test_enrol_authority_writes_a_private_key_and_prints_the_pin(authority, tmp_path):
    key, out = authority
    pub = key.with_name("authority.pub")
    assert mode(key) == 0o600 and pub.exists()
    pin = pinned_hex(out)
    assert out.strip().splitlines()[-1] == f'enrolment-authority="{pin}"'
    assert pin == pub.read_text().strip() == Authority.read(key).public_hex
    authority_key_from_hex(pin, source="test")  # what a device's policy accepts
    PrivacyPolicy.from_mapping({"enrolment-authority": pin}, source="test")


def test_enrol_authority_refuses_to_overwrite(authority, capsys):
    key, _ = authority
    before = key.read_bytes()
    code, out, err = run(capsys, "enrol", "authority", "--out", str(key.parent))
    assert code == 2 and out == "" and "refusing to overwrite" in err
    assert key.read_bytes() == before


# -- fedrec enrol device -------------------------------------------------------------------------------------
def test_enrol_device_issues_a_key_and_a_certificate_naming_the_device(authority, tmp_path, capsys):
    key, out = authority
    pin = authority_key_from_hex(pinned_hex(out), source="test")
    code, printed, _ = run(capsys, "enrol", "device", "--authority", str(key), "--device-id", "phone-17",
                           "--out", str(tmp_path / "phone-17"))
    assert code == 0 and 'device-id="phone-17"' in printed
    device_key, cert = tmp_path / "phone-17" / "device.key", tmp_path / "phone-17" / "device.crt"
    assert mode(device_key) == 0o600
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "phone-17"
    der = parsed.public_bytes(serialization.Encoding.DER)
    identity = DeviceIdentity.read(device_key, cert, authority=pin)  # what the device checks at start
    assert identity.device_id == "phone-17"
    assert verify_certificate(der, pin, "phone-17") == identity.public_key
    with pytest.raises(IdentityError, match="issued to 'phone-17'"):
        verify_certificate(der, pin, "phone-18")
    other = Authority.create().key.public_key()
    with pytest.raises(IdentityError, match="not issued by the pinned enrolment authority"):
        verify_certificate(der, other, "phone-17")
    # a second enrolment into the same folder is refused and leaves both files as they were
    before = (device_key.read_bytes(), cert.read_bytes())
    assert main(["enrol", "device", "--authority", str(key), "--device-id", "phone-17", "--out",
                 str(tmp_path / "phone-17")]) == 2
    assert (device_key.read_bytes(), cert.read_bytes()) == before


def test_enrol_device_certifies_a_public_key_the_device_made_without_seeing_its_private_key(authority, tmp_path,
                                                                                             capsys):
    key, out = authority
    pin = authority_key_from_hex(pinned_hex(out), source="test")
    device = tmp_path / "device"
    assert main(["device", "keygen", "--out", str(device)]) == 0
    assert mode(device / "device.key") == 0o600
    issued = tmp_path / "issued"
    assert main(["enrol", "device", "--authority", str(key), "--device-id", "tv-3", "--out", str(issued),
                 "--public-key", str(device / "device.pub"), "--days", "30"]) == 0
    assert sorted(p.name for p in issued.iterdir()) == ["device.crt"]  # no private key where the authority is
    identity = DeviceIdentity.read(device / "device.key", issued / "device.crt", authority=pin)
    assert identity.device_id == "tv-3"
    cert = x509.load_pem_x509_certificate((issued / "device.crt").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < datetime.timedelta(days=31)
    # keygen refuses to replace the device's key
    assert main(["device", "keygen", "--out", str(device)]) == 2


def test_enrol_device_errors_name_what_is_wrong(authority, tmp_path, capsys):
    key, _ = authority
    tls = tmp_path / "tls"
    assert main(["enrol", "tls", "--out", str(tls), "--host", "127.0.0.1"]) == 0
    code, _, err = run(capsys, "enrol", "device", "--authority", str(tls / "server.key"), "--device-id", "x",
                       "--out", str(tmp_path / "x"))
    assert code == 2 and "must be an Ed25519 private key" in err
    code, _, err = run(capsys, "enrol", "device", "--authority", str(key), "--device-id", "x", "--out",
                       str(tmp_path / "x"), "--public-key", str(tls / "ca.crt"))
    assert code == 2 and "cannot read a PEM public key" in err
    code, _, err = run(capsys, "enrol", "device", "--authority", str(key), "--device-id", " ", "--out",
                       str(tmp_path / "x"))
    assert code == 2 and "device id" in err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


# -- fedrec enrol tls and node-key ---------------------------------------------------------------------------
def test_enrol_tls_writes_the_ca_and_a_server_certificate_with_each_host_as_a_san(tmp_path, capsys):
    out = tmp_path / "tls"
    code, printed, _ = run(capsys, "enrol", "tls", "--out", str(out), "--host", "10.1.2.3", "--host",
                           "superlink.example.org", "--days", "90")
    assert code == 0 and "--ssl-keyfile server.key" in printed
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "server.key", "server.pem"]
    assert mode(out / "server.key") == 0o600
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    assert server.issuer == ca.subject and ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert datetime.timedelta(days=89) < server.not_valid_after_utc - server.not_valid_before_utc \
        < datetime.timedelta(days=91)
    key = serialization.load_pem_private_key((out / "server.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    before = (out / "server.key").read_bytes()
    assert main(["enrol", "tls", "--out", str(out), "--host", "10.1.2.3"]) == 2
    assert (out / "server.key").read_bytes() == before
    assert main(["enrol", "tls", "--out", str(tmp_path / "bind"), "--host", "0.0.0.0"]) == 2


def test_deploy_local_throwaway_tls_stays_two_days(tmp_path):
    from fedrec.simulation.credentials import write_tls

    files = write_tls(tmp_path)
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < datetime.timedelta(days=2, minutes=10)
    write_tls(tmp_path)  # deploy-local writes fresh ones over its own on each start


def test_enrol_node_key_writes_an_openssh_key_pair(tmp_path, capsys):
    out = tmp_path / "nodes"
    code, printed, _ = run(capsys, "enrol", "node-key", "--out", str(out), "--name", "phone-17")
    assert code == 0 and "flwr supernode register phone-17.pub" in printed
    assert mode(out / "phone-17") == 0o600
    private = serialization.load_ssh_private_key((out / "phone-17").read_bytes(), password=None)
    public = serialization.load_ssh_public_key((out / "phone-17.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert main(["enrol", "node-key", "--out", str(out), "--name", "phone-17"]) == 2
    assert main(["enrol", "node-key", "--out", str(out), "--name", "../escape"]) == 2


# -- what a deployed device does with the files --------------------------------------------------------------
def test_a_deployed_node_takes_the_enrolled_identity_and_the_pinned_authority(authority, tmp_path):
    from fedrec.client.nodes import DeployedNode
    from fedrec.shared.data.population import open_population
    from fedrec.shared.data.prepare import write_device_data

    key, out = authority
    config = RunConfig(devices=2, synthetic_items=20, synthetic_topics=2, synthetic_mean_events=8, embedding_dim=4)
    files = write_device_data(open_population(config), tmp_path / "data")
    assert main(["enrol", "device", "--authority", str(key), "--device-id", "phone-0", "--out",
                 str(tmp_path / "id")]) == 0

    def node(device_id: str) -> DeployedNode:
        node_config = {"data-path": str(files[0]), "catalogue-path": str(tmp_path / "data" / "catalogue.csv"),
                       "state-path": str(tmp_path / "state"), "device-id": device_id,
                       "identity-key": str(tmp_path / "id" / "device.key"),
                       "identity-cert": str(tmp_path / "id" / "device.crt"),
                       "enrolment-authority": pinned_hex(out)}
        return DeployedNode(Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                                    run_config={}), config)

    identity, pinned = node("phone-0").enrolment("phone-0")
    assert identity.device_id == "phone-0" and pinned.public_bytes_raw() == bytes.fromhex(pinned_hex(out))
    with pytest.raises(ValueError, match="issued to 'phone-0'"):
        node("phone-1").enrolment("phone-1")  # a certificate for another device is never used


def test_deploy_local_enrols_each_device_with_its_own_authority(tmp_path):
    from fedrec.simulation.deploy import LocalDeployment
    from fedrec.simulation.enrol import check_device

    deployment = LocalDeployment(tmp_path / "deploy")  # no process started
    pin = deployment.authority()
    assert deployment.authority() == pin  # kept across runs on the same folder
    credentials = tmp_path / "deploy" / "credentials"
    assert mode(credentials / "authority" / "authority.key") == 0o600
    key, cert = deployment.device_identity("device-0", "0")
    assert check_device(key, cert, pin, "device-0").device_id == "device-0"
    assert deployment.device_identity("device-0", "0") == (key, cert)  # reused, not re-issued
    assert not (credentials / "tls").exists() or not (credentials / "tls" / "authority.key").exists()


# -- fedrec device status ------------------------------------------------------------------------------------
def charged_device(folder: Path, policy: PrivacyPolicy) -> Device:
    """A deployed device's state folder after two rounds joined (one local, one secure sum at t = 10, c = 1), one
    decline and four refusals."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "node.json").write_text(json.dumps({"device-id": "phone-17"}))
    device = Device("phone-17", 1, lambda: None, FileStateStore(folder / "state.json"), DeviceSettings(4, 0.1, 0),
                    policy)
    assert device.reserve(plan(server_round=1, noise_multiplier=2.0))[0] is None
    assert device.reserve(plan(server_round=2, noise_multiplier=2.0, privacy="distributed"), 10, 1)[0] is None
    assert device.reserve(plan(server_round=3, privacy="distributed"), 500, 50)[0].refused == \
        "max-aggregation-threshold"
    assert device.reserve(plan(server_round=4, privacy="distributed"), 10, 0)[0].refused == "max-colluders"
    assert device.refuse(plan(server_round=5), device.load_state(), "enrolment").refused == "enrolment"
    assert device.reserve(plan(server_round=6, privacy="distributed"), 50, 5)[0].refused == \
        "max-aggregation-threshold"
    assert device.reserve(plan(server_round=7, noise_multiplier=0.3, steps=6))[0].declined  # past the budget
    return device


def test_device_status_prints_the_three_figures_budget_and_refusals_by_rule(tmp_path, capsys):
    policy = PrivacyPolicy(epsilon_budget=4.0, max_aggregation_threshold=20)
    folder = tmp_path / "state"
    device = charged_device(folder, policy)
    (folder / "policy.toml").write_text("epsilon-budget = 4.0\nmax-aggregation-threshold = 20\n")
    headline, honest, own = device.figures(device.load_state(), policy.max_delta, user_level=False)
    assert honest < headline < own

    code, out, _ = run(capsys, "device", "status", "--state-path", str(folder))
    assert code == 0
    assert out.splitlines()[0].startswith("device phone-17 (deployed")
    assert f"{headline:.4g}  headline" in out and f"{honest:.4g}  honest" in out and f"{own:.4g}  own share" in out
    assert "cannot enrol identities" in out and "honest but curious" in out and "controls enrolment" in out
    assert f"budget: 4, from {folder / 'policy.toml'}; left {4 - headline:.4g}" in out
    assert "rounds joined: 2 (1-2)" in out and "declined (budget): 1 (7)" in out
    assert "refused (policy): 4 (max-aggregation-threshold: 2, enrolment: 1, max-colluders: 1)" in out
    assert "secure sums: 1 (t=10 c=1: 1)" in out

    code, out, _ = run(capsys, "device", "status", "--state-path", str(folder), "--json")
    status = json.loads(out)
    assert status["record_level"] == pytest.approx({"malicious": headline, "honest": honest, "own_share": own})
    assert status["refused"] == {"max-aggregation-threshold": 2, "enrolment": 1, "max-colluders": 1}
    assert status["secure_sums"] == [[2, 10, 1]] and status["rounds"] == [1, 2] and status["declined"] == [7]
    assert status["budget_left"]["record_level"] == pytest.approx(4 - headline)
    assert status["user_level"] is None  # record-level releases: no user-level guarantee
    assert set(status["threats"]) == {"malicious", "honest", "own_share"}


def test_device_status_of_a_fresh_device_and_the_default_policy(tmp_path, capsys):
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "node.json").write_text(json.dumps({"device-id": "new-1"}))  # said hello, never got a plan
    code, out, _ = run(capsys, "device", "status", "--state-path", str(folder))
    assert code == 0 and "device new-1" in out and "rounds joined: 0" in out
    assert "budget: 8, from the default policy" in out and "left 8 at the record level" in out
    # an explicit policy file wins
    (tmp_path / "mine.toml").write_text("epsilon-budget = 2.0\n")
    assert main(["device", "status", "--state-path", str(folder), "--policy", str(tmp_path / "mine.toml")]) == 0
    assert "budget: 2, from" in capsys.readouterr().out


def test_device_status_shows_user_level_figures_where_finite(tmp_path, capsys):
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "node.json").write_text(json.dumps({"device-id": "u-1"}))
    device = Device("u-1", 1, lambda: None, FileStateStore(folder / "state.json"), DeviceSettings(4, 0.1, 0),
                    PrivacyPolicy())
    assert device.reserve(plan(server_round=1, noise_multiplier=2.0, privacy="user", user_steps=0,
                                update_clip=0.5), 10, 1)[0] is None
    status = json.loads(run(capsys, "device", "status", "--state-path", str(folder), "--json")[1])
    user = device.figures(device.load_state(), 1e-5, user_level=True)
    assert status["user_level"] == pytest.approx(dict(zip(("malicious", "honest", "own_share"), user)))
    assert status["budget_left"]["user_level"] == pytest.approx(8.0 - user[0])
    assert "user-level epsilon at delta" in run(capsys, "device", "status", "--state-path", str(folder))[1]


def test_device_status_of_a_simulated_device_reads_its_slot_files_and_the_runs_policy(tmp_path, capsys):
    run_dir = tmp_path / "run"
    states = run_dir / "device-state"
    config = RunConfig(epsilon_budget=6.0, device_policy="max-colluders=2")
    (run_dir).mkdir()
    (run_dir / "config.json").write_text(json.dumps(config.to_mapping()))
    for device_id in ("sim-0", "sim-1"):
        device = Device(device_id, 1, lambda: None, SlotStateStore(states, device_id), DeviceSettings(4, 0.1, 0),
                        PrivacyPolicy(epsilon_budget=6.0))
        assert device.reserve(plan(server_round=1, noise_multiplier=2.0, privacy="distributed"), 5, 2)[0] is None
    code, out, _ = run(capsys, "device", "status", "--state-dir", str(states), "--device-id", "sim-1")
    assert code == 0 and "device sim-1 (simulated" in out and "secure sums: 1 (t=5 c=2: 1)" in out
    assert f"budget: 6, from {run_dir / 'config.json'}" in out


def test_device_status_and_recommend_say_what_is_wrong_with_the_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, _, err = run(capsys, "device", "status", "--state-path", str(missing))
    assert code == 2 and f"{missing}: no such folder" in err
    code, _, err = run(capsys, "device", "recommend", "--state-path", str(missing), "--catalogue", "c.csv")
    assert code == 2 and f"{missing}: no such folder" in err and "no item model yet" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "device", "status", "--state-path", str(tmp_path / "empty"))
    assert code == 2 and "not a device state folder" in err
    states = tmp_path / "run" / "device-state"
    Device("sim-4", 1, lambda: None, SlotStateStore(states, "sim-4"), DeviceSettings(4, 0.1, 0),
           PrivacyPolicy()).reserve(plan())
    code, _, err = run(capsys, "recommend", "--state-path", str(states), "--catalogue", "c.csv")
    assert code == 2 and "moved to `fedrec device recommend`" in err
    assert "a simulation's device-state folder" in err and "--device-id sim-4" in err
    (tmp_path / "run" / "config.json").write_text("{}")
    code, _, err = run(capsys, "device", "recommend", "--state-path", str(tmp_path / "run"), "--catalogue", "c.csv")
    assert code == 2 and "a simulation's run directory" in err and "no item model yet" not in err
    node = tmp_path / "fresh"  # a deployed device that said hello but has not trained yet
    node.mkdir()
    (node / "node.json").write_text(json.dumps({"device-id": "u-7"}))
    code, _, err = run(capsys, "device", "recommend", "--state-path", str(node), "--catalogue", "c.csv")
    assert code == 2 and "no item model yet (the device receives one in its first round)" in err
    code, _, err = run(capsys, "device", "status", "--state-dir", str(states), "--device-id", "sim-9")
    assert code == 2 and "no state for device 'sim-9'" in err and "sim-4" in err
    code, _, err = run(capsys, "device", "status", "--state-dir", str(states))  # no device id
    assert code == 2 and "--device-id" in err

"""The secure modes' attacks: they find the canaries when the noise is weak and find nothing when it is strong;
the report has the audit-attacks.json form and `fedrec audit --attacks` writes it from the run's own settings."""

from __future__ import annotations

import json

import pytest

from fedrec.shared.config import RunConfig
from fedrec.simulation.attacks import attack_report

WEAK_NOISE_POLICY = "min-noise-multiplier=0.01 min-user-noise-multiplier=0.01"  # the devices accept z = 0.05
KEYS = {"name", "threat", "success", "bound", "bound_kind", "max_bound", "meaning"}


def tiny(mode: str, noise: float) -> RunConfig:
    return RunConfig(devices=40, synthetic_items=200, synthetic_topics=3, synthetic_mean_events=10, embedding_dim=4,
                     num_negatives=1, rounds=2, devices_per_round=20, eval_every=1000, privacy=mode,
                     noise_multiplier=noise, popularity_prior=False, epsilon_budget=1e6,
                     device_policy=WEAK_NOISE_POLICY)


def by_name(report: dict) -> dict[str, dict]:
    for entry in report["attacks"]:
        assert KEYS <= set(entry), entry
        assert set(entry["success"]) == {"hits", "trials", "label"}
        assert entry["bound_kind"] in ("lower bound", "estimate", "none")
        if entry["bound_kind"] == "lower bound":
            assert 0.0 <= entry["bound"] <= entry["max_bound"] + 1e-9
    return {entry["name"]: entry for entry in report["attacks"]}


@pytest.mark.parametrize("mode", ["distributed", "user"])
def test_weak_noise_gives_the_canaries_away(mode):
    report = attack_report(tiny(mode, 0.05), from_audited_run=False)
    fed = report["federation"]
    assert (fed["mode"], fed["devices"], fed["items"], fed["rounds"], fed["from_audited_run"]) == (mode, 40, 200, 2,
                                                                                                    False)
    attacks = by_name(report)
    unit = "record" if mode == "distributed" else "device"
    for name in (f"{unit} canaries in the decrypted sums", f"{unit} canaries in one device's own share"):
        success = attacks[name]["success"]
        assert success["hits"] >= 0.9 * success["trials"] > 0, (name, success)
        assert attacks[name]["bound"] > 0.5, name
        assert attacks[name]["epsilon_accountant"] > attacks[name]["bound"]  # a lower bound under the accountant
    if mode == "user":
        assert attacks["one-shot estimate (Andrew et al. 2024)"]["bound"] > 5.0


@pytest.mark.parametrize("mode", ["distributed", "user"])
def test_strong_noise_hides_the_canaries_in_the_sums(mode):
    attacks = by_name(attack_report(tiny(mode, 30.0), from_audited_run=False))
    unit = "record" if mode == "distributed" else "device"
    assert attacks[f"{unit} canaries in the decrypted sums"]["bound"] == 0.0
    if mode == "user":
        estimate = attacks["one-shot estimate (Andrew et al. 2024)"]
        assert estimate["bound_kind"] == "estimate" and estimate["bound"] < 1.0


def test_cli_attacks_default_to_the_audited_runs_settings(tmp_path, capsys):
    from fedrec.simulation.cli import main

    run = tmp_path / "run"
    run.mkdir()
    config = tiny("distributed", 0.05).replace(out_dir=str(run))
    (run / "config.json").write_text(json.dumps(config.to_mapping()), encoding="utf-8")
    from fedrec.simulation.attacks import attack_federation

    settings, from_run = attack_federation(str(run), {})
    assert from_run and settings.privacy == "distributed" and settings.devices == 40
    settings, from_run = attack_federation(str(run), {"rounds": 1})
    assert not from_run and settings.rounds == 1 and settings.privacy == "distributed"
    settings_file = tmp_path / "attack.toml"
    settings_file.write_text("\n".join([
        'devices = 40', 'synthetic-items = 200', 'embedding-dim = 4', 'devices-per-round = 20', 'privacy = "user"',
        'noise-multiplier = 0.05', 'popularity-prior = false', 'epsilon-budget = 1e6', 'num-negatives = 1',
        f'device-policy = "{WEAK_NOISE_POLICY}"']) + "\n", encoding="utf-8")
    assert main(["audit", "--attacks", "--out", str(tmp_path / "alone"), "--run-config", str(settings_file),
                 "--run-config", "rounds=1"]) == 0
    written = json.loads((tmp_path / "alone" / "audit-attacks.json").read_text(encoding="utf-8"))
    assert written["federation"]["mode"] == "user" and not written["federation"]["from_audited_run"]
    out = capsys.readouterr().out
    assert "empirical attacks on a separate federation: user mode" in out
    assert "the true epsilon is at least this" in out


def test_local_mode_report_has_item_inference_and_record_canaries():
    config = tiny("local", 0.05).without_dp()
    attacks = by_name(attack_report(config, from_audited_run=False))
    inference = attacks["item inference"]
    assert inference["bound"] is None and inference["bound_kind"] == "none"
    assert inference["success"]["hits"] >= 0.5 * inference["success"]["trials"] > 0  # chance is about 5%
    canaries = attacks["record canaries"]
    assert canaries["success"]["hits"] >= 0.9 * canaries["success"]["trials"] > 0 and canaries["bound"] > 0.5

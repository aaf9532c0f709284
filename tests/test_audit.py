"""The independent audit: pinned published values, honest and tampered ledgers, user-level DP, attacks."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis import rdp as opacus_rdp

from fedrec.server.audit import audit_run, classic_rdp_conversion
from fedrec.server.core import round_plan
from fedrec.shared.config import RunConfig
from fedrec.shared.privacy.accounting import epsilon
from fedrec.shared.privacy.releases import release_cost
from fedrec.simulation.cli import main as fedrec
from tests.conftest import read_jsonl


def test_tf_privacy_tutorial_value_with_the_classic_conversion():
    # TF Privacy MNIST tutorial: sigma 1.12, batch 256 of 60,000, 60 epochs -> epsilon 2.92 at delta 1e-5
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    steps = math.ceil(60 * 60000 / 256)
    rdp = opacus_rdp.compute_rdp(q=256 / 60000, noise_multiplier=1.12, steps=steps, orders=orders)
    assert classic_rdp_conversion(orders, rdp, 1e-5) == pytest.approx(2.92, abs=0.005)


def test_a_real_run_passes_with_every_required_field(finished_run):
    _, _, run_dir, _ = finished_run
    result = audit_run(run_dir)
    assert result["verdict"] == "pass", result["flags"]
    for key in ("verdict", "devices", "epsilon_max_reported", "epsilon_max_recomputed", "max_relative_diff",
                "over_budget", "flags"):
        assert key in result
    assert result["devices"] == 24 and result["max_relative_diff"] < 1e-3
    assert result["epsilon_max_recomputed_pld"] <= result["epsilon_max_recomputed"]


def tampered_copy(run_dir: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(run_dir, copy)
    entries = read_jsonl(copy / "ledger.jsonl")
    change(entries)
    (copy / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return copy


def test_a_device_reporting_less_epsilon_is_flagged(finished_run, tmp_path):
    def lower(entries):
        last = entries[-1]
        device = sorted(last["epsilon_reported"])[0]
        last["epsilon_reported"][device] *= 0.5

    result = audit_run(tampered_copy(finished_run[2], tmp_path, lower))
    assert result["verdict"] == "fail"
    assert any(f["code"] == "epsilon_under_reported" for f in result["flags"])


def lines(entries, kind, status="done"):
    """The ledger lines of one kind: each round attempt has a write-ahead ('sent') and an outcome ('done') line."""
    return [e for e in entries if e["kind"] == kind and e["status"] == status]


@pytest.mark.parametrize("forged", ["outcome line only", "both lines"])
def test_a_round_run_with_other_parameters_is_flagged(finished_run, tmp_path, forged):
    def loosen(entries):
        for line in lines(entries, "train")[:1] + (lines(entries, "train", "sent")[:1] if forged == "both lines" else []):
            line["plan"]["sample-rate"] = 0.5

    result = audit_run(tampered_copy(finished_run[2], tmp_path, loosen))
    codes = {f["code"] for f in result["flags"]}
    expected = "ledger_lines_disagree" if forged == "outcome line only" else "plan_differs_from_config"
    assert result["verdict"] == "fail" and expected in codes


@pytest.mark.parametrize("field,value", [("user-scale", 1e-40), ("num-negatives", 1), ("grad-sample-mode", "ghost")])
def test_every_plan_field_is_checked_against_the_config(finished_run, tmp_path, field, value):
    def craft(entries):  # a consistent forgery of a round's plan in both of its lines
        for line in [e for e in entries if e["kind"] == "train" and e["round"] == 2]:
            line["plan"][field] = value

    result = audit_run(tampered_copy(finished_run[2], tmp_path, craft))
    assert result["verdict"] == "fail" and any(f["code"] == "plan_differs_from_config" and field in f["message"]
                                               for f in result["flags"])


def test_a_hidden_participation_is_flagged(finished_run, tmp_path):
    def hide(entries):
        entry = lines(entries, "train")[0]
        device = next(d for d in lines(entries, "popularity")[0]["trained"] if d not in entry["trained"])
        entry["trained"].append(device)  # it trained, but its report below is not raised

    result = audit_run(tampered_copy(finished_run[2], tmp_path, hide))
    assert result["verdict"] == "fail"


def test_a_ledger_torn_by_a_crash_is_a_warning(finished_run, tmp_path):
    copy = tmp_path / "torn"
    shutil.copytree(finished_run[2], copy)
    with open(copy / "ledger.jsonl", "a") as fh:
        fh.write('{"round": 9, "kind": "tr')
    result = audit_run(copy)
    assert result["verdict"] == "pass"
    assert [f["code"] for f in result["flags"]] == ["ledger_unreadable_line"]


def test_a_round_cut_short_by_a_crash_is_charged_to_every_device_asked(finished_run, tmp_path):
    def crash(entries):  # the server wrote the next round ahead, sent it, and died before any outcome
        last = lines(entries, "train", "sent")[-1]
        entries.append({**last, "round": last["round"] + 1, "attempt": 0})

    honest = audit_run(finished_run[2])
    result = audit_run(tampered_copy(finished_run[2], tmp_path, crash))
    assert "round_unfinished" in {f["code"] for f in result["flags"]}
    asked = lines(read_jsonl(finished_run[2] / "ledger.jsonl"), "train", "sent")[-1]["asked"]
    for device in asked:
        assert result["per_device"][device]["charged_rdp"] > honest["per_device"][device]["charged_rdp"]
        assert result["per_device"][device]["recomputed_rdp"] == honest["per_device"][device]["recomputed_rdp"]
    assert result["epsilon_max_charged"] > honest["epsilon_max_charged"]


def test_rejected_replies_are_charged_and_over_reporting_fails(finished_run, tmp_path):
    def reject(entries):
        line = lines(entries, "train")[0]
        device = line["trained"].pop(0)
        line["rejected"][device] = "bad reply"  # the server received it: its epsilon counts
        for later in entries:
            later.get("epsilon_reported", {}).pop(device, None)

    result = audit_run(tampered_copy(finished_run[2], tmp_path, reject))
    assert any(row["charged_rdp"] > row["recomputed_rdp"] for row in result["per_device"].values())

    def inflate(entries):
        last = [e for e in entries if e["status"] == "done" and e["epsilon_reported"]][-1]
        device = sorted(last["epsilon_reported"])[0]
        last["epsilon_reported"][device] *= 3

    result = audit_run(tampered_copy(finished_run[2], tmp_path / "2", inflate))
    assert result["verdict"] == "fail" and "epsilon_over_reported" in {f["code"] for f in result["flags"]}


def write_honest_run(path: Path, *, sigma: float, rounds: int, participation: list[list[int]],
                     budget: float = 1e9, privacy: str = "local", t_min: int = 0, colluders: int = 0,
                     seen: Callable[[int, str], tuple[int, int] | None] | None = None,
                     rejected: dict[int, list[int]] | None = None, failed: dict[int, list[int]] | None = None,
                     unfinished: list[int] | None = None) -> RunConfig:
    """A run directory whose ledger is what honest devices (our accountant) would have reported.

    privacy='distributed' or 'user': every round is a secure sum of (t_min, colluders), ledgered ahead ('sent') and
    after ('done'); each device accounts with the (t, c) `seen(round, device)` gives (default the ledger's) and
    reports it, with its three figures (shared/privacy/releases.py). `rejected` / `failed`: round -> devices that
    trained (and charged) but whose reply the server rejected / lost; `unfinished`: devices asked in one more round
    that was written ahead and never completed (they trained too). Local mode writes outcome lines only, as older
    ledgers did.
    """
    secure = privacy in ("distributed", "user")
    extra = {"distributed": {"local_steps": 1, "user_steps": 1}, "user": {"delta_clip_norm": 1.0, "user_steps": 0},
             "local": {"user_steps": 0}}[privacy]
    config = RunConfig(noise_multiplier=sigma, rounds=rounds + bool(unfinished), epsilon_budget=budget,
                       popularity_prior=False, privacy=privacy, **extra)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config.to_mapping()))
    histories: dict[str, dict[str, list]] = {}
    figures = ("record", "record_honest", "record_subverted") if privacy != "user" else \
        ("user", "user_honest", "user_subverted")
    lines = []

    def train(device: str, plan, rnd: int) -> tuple[int, int] | None:
        tc = (seen(rnd, device) if seen else None) or (t_min, colluders) if secure else None
        cost = release_cost(plan, *(tc or (0, 0)))
        for figure in figures:
            histories.setdefault(device, {}).setdefault(figure, []).extend(getattr(cost, figure))
        return tc

    def report(device: str, figure: int) -> float:  # local mode's devices account a q = 1 history exactly
        return epsilon(histories[device][figures[figure]], delta=config.delta, exact_gaussian=not secure)

    for rnd, members in enumerate([*participation, *([unfinished] if unfinished else [])], start=1):
        plan = round_plan(config, rnd, sigma)
        trained = [f"d{k}" for k in members]
        lost = {f"d{k}": "bad reply" for k in (rejected or {}).get(rnd, [])}
        gone = {f"d{k}": "no reply before the round timeout" for k in (failed or {}).get(rnd, [])}
        asked = sorted({*trained, *lost, *gone})
        line = {"round": rnd, "kind": "train", "attempt": 0, "plan": plan.to_config(),
                "privacy_steps": [list(step) for step in plan.privacy_steps()], "asked": asked}
        cut_short = bool(unfinished) and rnd == len(participation) + 1
        if secure or cut_short:
            lines.append({**line, "status": "sent", **({"t_min": t_min, "colluders": colluders} if secure else {})})
        sums = {device: train(device, plan, rnd) for device in [*trained, *lost, *gone]}
        if cut_short:
            break
        done = {**line, "trained": trained, "declined": [], "refused": {}, "rejected": lost, "failed": gone,
                "epsilon_reported": {d: report(d, 0) for d in trained}}
        if secure:
            done.update(status="done", epsilon_honest_reported={d: report(d, 1) for d in trained},
                        epsilon_subverted_reported={d: report(d, 2) for d in trained},
                        secure_sum_seen={d: list(sums[d]) for d in trained},
                        secure_sum={"t_min": t_min, "colluders": colluders, "shares": len(trained),
                                    "aggregation": "modelled", "decrypted": len(trained) >= t_min})
        lines.append(done)
    (path / "ledger.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return config


ledgers = st.tuples(st.floats(0.8, 6.0), st.integers(1, 6), st.integers(2, 6)).flatmap(
    lambda t: st.tuples(st.just(t[0]), st.lists(st.lists(st.integers(0, t[2] - 1), min_size=1, max_size=t[2],
                                                         unique=True), min_size=t[1], max_size=t[1])))


@settings(max_examples=25, deadline=None)
@given(ledger=ledgers, cut=st.floats(0.01, 0.9), pick=st.integers(0, 1000))
def test_honest_ledgers_pass_and_under_reporting_always_fails(tmp_path_factory, ledger, cut, pick):
    sigma, participation = ledger
    honest = tmp_path_factory.mktemp("honest")
    write_honest_run(honest / "run", sigma=sigma, rounds=len(participation), participation=participation)
    assert audit_run(honest / "run")["verdict"] == "pass"
    entries = read_jsonl(honest / "run" / "ledger.jsonl")
    last_report: dict[str, tuple[int, float]] = {}
    for index, entry in enumerate(entries):
        for device, eps in entry["epsilon_reported"].items():
            last_report[device] = (index, eps)
    device = sorted(last_report)[pick % len(last_report)]
    index, eps = last_report[device]
    entries[index]["epsilon_reported"][device] = eps * (1 - cut)
    (honest / "run" / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    flags = audit_run(honest / "run")["flags"]
    assert any(f["code"] == "epsilon_under_reported" and f["device"] == device for f in flags)


def test_over_budget_is_flagged(tmp_path):
    write_honest_run(tmp_path / "run", sigma=1.0, rounds=3, participation=[[0], [0], [0]], budget=5.0)
    result = audit_run(tmp_path / "run")
    assert result["verdict"] == "fail" and result["over_budget"] == ["d0"]


def test_cli_exit_code_and_json(finished_run, tmp_path, capsys):
    assert fedrec(["audit", str(finished_run[2]), "--json", "--out", str(tmp_path / "a")]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["verdict"] == "pass" and (tmp_path / "a" / "audit.md").exists()
    assert (tmp_path / "a" / "epsilon_per_device.png").exists()
    write_honest_run(tmp_path / "bad", sigma=1.0, rounds=3, participation=[[0], [0], [0]], budget=5.0)
    assert fedrec(["audit", str(tmp_path / "bad"), "--json"]) == 1


@pytest.mark.e2e
def test_user_level_dp_is_accounted_and_recomputed(tmp_path):
    from fedrec.simulation.runner import simulate

    config = RunConfig(devices=16, synthetic_items=40, synthetic_topics=4, synthetic_mean_events=10,
                       embedding_dim=4, num_negatives=4, rounds=3, devices_per_round=8, eval_every=5,
                       delta_clip_norm=5.0, central_noise_multiplier=1.0, device_sampling="poisson",
                       out_dir=str(tmp_path / "run"))
    summary = simulate(config)
    user = summary["privacy"]["user_level"]
    assert user["epsilon"] < user["epsilon_without_amplification"]
    assert "Poisson" in user["sampling_assumption"] and user["rounds"] == 3
    result = audit_run(tmp_path / "run")
    assert result["verdict"] == "pass", result["flags"]
    assert result["user_level"]["epsilon_recomputed"] == pytest.approx(user["epsilon"], rel=1e-3)
    metrics = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "train"]
    assert all("clipped" in m for m in metrics)


@pytest.mark.e2e
def test_attacks_succeed_without_dp_and_fail_with_it():
    from fedrec.simulation.attacks import default_attack_config, run_attacks

    config = default_attack_config().replace(devices=300, synthetic_items=120, rounds=8, devices_per_round=150)
    out = run_attacks(config)
    assert out["item_inference"]["no_dp"]["auc"] > 0.85
    assert abs(out["item_inference"]["dp"]["auc"] - 0.5) < 0.1
    canary = out["canary"]
    assert canary["epsilon_lower_bound"] < canary["epsilon_accountant"]
    assert canary["no_dp"]["epsilon_lower_bound"] > canary["epsilon_lower_bound"]
    assert canary["no_dp"]["correct"] > 0.9 * canary["no_dp"]["guesses"]

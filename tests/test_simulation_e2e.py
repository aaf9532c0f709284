"""End to end through the real Flower app in the simulation engine: run, resume, bad replies, audit of epsilon."""

from __future__ import annotations


import numpy as np
import pytest

from fedrec.shared.evaluation import METRIC_KEYS
from fedrec.simulation.runner import simulate
from fedrec.server.audit import device_epsilon
from fedrec.shared.privacy.accounting import compact_history

from tests.test_accounting import independent_epsilon

pytestmark = pytest.mark.e2e


from tests.conftest import read_jsonl, wait_until_gone

def test_run_directory_and_summary(finished_run):
    config, summary, run_dir, _ = finished_run
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.jsonl", "ledger.jsonl",
                                                    "checkpoint.npz", "summary.json", "device-state"}
    assert summary["dataset"] == "synthetic" and summary["devices"] == 24 and summary["rounds"] == 3
    assert summary["dp"] is True
    for block in [summary["metrics"], *summary["baselines"].values()]:
        assert list(block) == list(METRIC_KEYS)
        assert all(0.0 <= v <= 1.0 for v in block.values())
    assert set(summary["baselines"]) == {"random", "popularity", "central_mf"}
    privacy = summary["privacy"]["record_level"]
    assert 0 < privacy["epsilon_median"] <= privacy["epsilon_max"] <= privacy["budget"] == 4.0
    assert privacy["delta"] == config.delta
    train_lines = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "train"]
    assert [m["round"] for m in train_lines] == [1, 2, 3]
    assert all(m["trained"] + m["declined"] == 8 for m in train_lines)
    assert summary["federated_eval"]["devices"] + summary["federated_eval"]["declined"] == 24


def test_federated_evaluation_is_a_noised_release_charged_to_each_device(finished_run):
    """Every device evaluated itself in the final round with noise on its metrics, charged like any release."""
    config, summary, run_dir, _ = finished_run
    federated = summary["federated_eval"]
    assert federated["devices"] >= 20 and federated["noise_stderr"] == pytest.approx(
        config.eval_noise_multiplier * np.sqrt(3) / np.sqrt(federated["devices"]))
    for key in ("hr@10", "ndcg@10", "recall@20"):  # the central figure, up to the release noise
        assert abs(federated[key] - summary["metrics"][key]) < 5 * federated["noise_stderr"]
    evaluations = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["kind"] == "evaluate" and e["status"] == "done"]
    assert [e["round"] for e in evaluations] == [2, 3]
    assert all(e["privacy_steps"] == [[config.eval_noise_multiplier, 1.0, 1]] for e in evaluations)


def test_reported_epsilon_equals_an_independent_recomputation(finished_run):
    _, _, run_dir, _ = finished_run
    ledger = read_jsonl(run_dir / "ledger.jsonl")
    histories: dict[str, list] = {}
    reported: dict[str, float] = {}
    assert ledger[0]["kind"] == "popularity" and ledger[0]["round"] == 0 and ledger[0]["status"] == "sent"
    for entry in (e for e in ledger if e["status"] == "done"):
        for device in entry["trained"]:
            histories.setdefault(device, []).extend(tuple(step) for step in entry["privacy_steps"])
        reported.update(entry["epsilon_reported"])
    assert histories
    for device, history in histories.items():
        # local mode: devices account the Gaussian composition exactly, dp-accounting's PLD recomputes it
        assert reported[device] == pytest.approx(device_epsilon(tuple(compact_history(history)), 1e-5, True), rel=1e-3)
        assert reported[device] < independent_epsilon(history, 1e-5)  # tighter than RDP


def test_user_rows_stay_in_device_state(finished_run):
    _, _, run_dir, _ = finished_run
    states = sorted((run_dir / "device-state").glob("sim-*.json"))
    assert states
    ledger_text = (run_dir / "ledger.jsonl").read_text() + (run_dir / "metrics.jsonl").read_text()
    assert "user_row" not in ledger_text


def test_no_background_process_is_left(finished_run):
    assert wait_until_gone(finished_run[3]) == {}


def test_resume_continues_rounds_ledger_and_budgets(tmp_path):
    from fedrec.shared.config import RunConfig
    from fedrec.shared.state import SlotStateStore

    config = RunConfig(devices=10, synthetic_items=40, synthetic_topics=4, synthetic_mean_events=10,
                       embedding_dim=4, num_negatives=4, rounds=2, devices_per_round=10, eval_every=5,
                       noise_multiplier=3.0, prior_noise_multiplier=1.0, out_dir=str(tmp_path / "run"))
    simulate(config)
    before = SlotStateStore(tmp_path / "run" / "device-state", "sim-0").load()
    assert before.rounds == (0, 1, 2)  # round 0: the popularity report
    with pytest.raises(Exception, match="already holds a run"):
        simulate(config.replace(rounds=3))
    summary = simulate(config.replace(rounds=3, resume=True))
    after = SlotStateStore(tmp_path / "run" / "device-state", "sim-0").load()
    assert after.rounds == (0, 1, 2, 3)
    assert dict(((s, q), n) for s, q, n in after.history) == {(1.0, 1.0): 1, (3.0, 1.0): 3, (6.0, 1.0): 3}
    ledger = read_jsonl(tmp_path / "run" / "ledger.jsonl")
    assert [(e["round"], e["status"]) for e in ledger] == [(r, s) for r in (0, 1, 2, 3) for s in ("sent", "done")]
    assert summary["rounds"] == 3


def test_a_resume_from_round_0_does_not_rerun_the_prior_and_a_rerun_round_is_charged_again(tmp_path):
    """The checkpoint says round 0: the popularity round is not run again; round 1, which devices already paid
    for, runs as attempt 1 (fresh noise), and the audit charges both attempts."""
    from fedrec.server.audit import audit_run
    from fedrec.server.records import RunRecords
    from fedrec.shared.config import RunConfig

    config = RunConfig(devices=6, synthetic_items=40, synthetic_topics=4, synthetic_mean_events=10,
                       embedding_dim=4, num_negatives=4, rounds=1, devices_per_round=6, eval_every=5,
                       noise_multiplier=3.0, prior_noise_multiplier=1.0, out_dir=str(tmp_path / "run"))
    simulate(config)
    records = RunRecords(tmp_path / "run")
    checkpoint = records.load_checkpoint()
    checkpoint.server_round = 0  # as if the server had stopped right after the popularity round
    records.save_checkpoint(checkpoint)
    simulate(config.replace(resume=True))
    ledger = read_jsonl(tmp_path / "run" / "ledger.jsonl")
    assert [(e["kind"], e["round"], e["attempt"], e["status"]) for e in ledger] == [
        ("popularity", 0, 0, "sent"), ("popularity", 0, 0, "done"), ("train", 1, 0, "sent"), ("train", 1, 0, "done"),
        ("train", 1, 1, "sent"), ("train", 1, 1, "done")]
    audit = audit_run(tmp_path / "run")
    assert audit["verdict"] == "pass" and "round_repeated" in {f["code"] for f in audit["flags"]}
    assert max(row["rounds"].count(1) for row in audit["per_device"].values()) == 2


def test_bad_replies_are_rejected_and_rounds_complete(tmp_path):
    from fedrec.shared.config import RunConfig

    def corrupt(message, context, call_next):
        """Devices 1 and 2 (one per node: device engine) send a NaN / wrongly shaped update."""
        from flwr.app import Array

        reply = call_next(message, context)
        partition = int(context.node_config["partition-id"])
        if message.metadata.message_type == "train" and partition in (1, 2) and "delta" in reply.content:
            delta = reply.content["delta"]
            emb = delta["item-embedding-delta"].numpy()
            bad = np.full_like(emb, np.nan) if partition == 1 else emb[:-1]
            delta["item-embedding-delta"] = Array(bad)
        return reply

    config = RunConfig(devices=8, synthetic_items=40, synthetic_topics=4, synthetic_mean_events=10,
                       embedding_dim=4, num_negatives=4, rounds=2, devices_per_round=8, eval_every=5,
                       noise_multiplier=3.0, simulation_engine="device", out_dir=str(tmp_path / "run"))
    summary = simulate(config, client_mods=[corrupt])
    ledger = [e for e in read_jsonl(tmp_path / "run" / "ledger.jsonl") if e["status"] == "done"]
    assert [e["kind"] for e in ledger] == ["popularity", "train", "train"]
    for entry in ledger[1:]:
        assert set(entry["rejected"]) == {"sim-1", "sim-2"}
        assert "NaN" in entry["rejected"]["sim-1"] and "shape" in entry["rejected"]["sim-2"]  # server-side reasons
        assert len(entry["trained"]) == 6
    assert summary["privacy"]["record_level"]["devices_trained"] == 6


def test_the_plain_loop_runs_the_same_federation(finished_run):
    """Without Flower, the same server core, nodes and device code give the same model and epsilons."""
    from fedrec.server.core import shrink_embeddings
    from fedrec.server.records import RunRecords
    from fedrec.simulation.plain import run_plain

    config, summary, run_dir, _ = finished_run
    plain = run_plain(config.replace(out_dir="", state_dir=""))
    checkpoint = RunRecords(run_dir).load_checkpoint()
    from fedrec.shared.data.population import open_population
    from fedrec.shared.head import fill_tail

    flower_tables = shrink_embeddings(checkpoint.tables, checkpoint.noise_variance)
    categories = open_population(config).catalogue().categories  # devices rank the tail by its category's rows
    filled = fill_tail(flower_tables.embedding, checkpoint.head, list(categories) if categories else None)
    np.testing.assert_allclose(plain.tables.embedding, filled, rtol=0, atol=1e-6)
    np.testing.assert_allclose(plain.tables.bias, flower_tables.bias, rtol=0, atol=1e-6)
    # The plain loop does not evaluate on devices: compare with the epsilons reported before the first evaluation.
    reported: dict[str, float] = {}
    ledger = [e for e in read_jsonl(run_dir / "ledger.jsonl") if e["status"] == "done"]
    for entry in ledger[:next(i for i, e in enumerate(ledger) if e["kind"] == "evaluate")]:
        reported.update(entry["epsilon_reported"])
    plain_config = config.replace(out_dir="", state_dir="", rounds=2, federated_eval=False)
    plain_epsilon = run_plain(plain_config.replace(noise_multiplier=plain.noise_multiplier)).epsilon
    assert plain_epsilon == pytest.approx(reported, rel=1e-12)

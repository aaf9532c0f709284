"""The learning curve: central evaluations every N rounds (simulation only, no privacy cost), their metrics.jsonl rows,
the plot beside the epsilon spent, and the results table marking noised federated metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrec.server.central_eval import KIND, CentralEvaluation
from fedrec.server.records import METRICS, RunRecords
from fedrec.shared.config import RunConfig
from fedrec.simulation.learning_curve import FILE, curve_points, write_learning_curve
from fedrec.simulation.runner import format_table

ROWS = [
    {"kind": KIND, "round": 0, "hr@10": 0.05},
    {"kind": "train", "round": 1, "epsilon_max_reported": 1.5},
    {"kind": "train", "round": 2, "epsilon_max_reported": 1.2},  # another cohort: the largest so far stays 1.5
    {"kind": KIND, "round": 2, "hr@10": 0.10},
    {"kind": "evaluate", "round": 2, "hr@10": 0.12, "noise_stderr": 0.03},
    {"kind": "train", "round": 3, "epsilon_max_reported": 2.5},
    {"kind": "final_evaluate", "round": 3, "hr@10": 0.11, "noise_stderr": 0.02},
]


def test_curve_points():
    points = curve_points(ROWS)
    assert points["central"] == [(0, 0.05), (2, 0.10)]
    assert points["federated"] == [(2, 0.12, 0.03), (3, 0.11, 0.02)]
    assert points["epsilon"] == [(1, 1.5), (2, 1.5), (3, 2.5)]
    ledger = [{"status": "sent", "round": 0, "epsilon_reported": {}},
              {"status": "done", "round": 0, "kind": "popularity", "epsilon_reported": {"a": 2.0, "b": 2.0}},
              {"status": "done", "round": 1, "kind": "train", "epsilon_reported": {"a": 3.0}},
              {"status": "done", "round": 1, "kind": "evaluate", "epsilon_reported": {"b": 3.5}},
              {"status": "done", "round": 2, "kind": "train", "epsilon_reported": {"b": 3.6, "c": None}},
              {"status": "done", "round": 3, "kind": "train", "epsilon_reported": {"b": 3.7}}]
    # round 0's popularity report shows; a release without DP (null) ends the finite figures
    assert curve_points(ROWS, ledger)["epsilon"] == [(0, 2.0), (1, 3.5)]


def test_the_plot_is_written_from_metrics_and_only_where_the_run_evaluated(tmp_path):
    records = RunRecords(tmp_path)
    for row in ROWS[1:3]:
        records.append(METRICS, row)
    assert write_learning_curve(tmp_path) is None  # training rows only: no curve to draw
    for row in ROWS[3:]:
        records.append(METRICS, row)
    (tmp_path / "summary.json").write_text(json.dumps({"dataset": "synthetic", "devices": 12, "items": 40,
                                                       "rounds": 3, "privacy": {"record_level": {"budget": 4.0}}}))
    path = write_learning_curve(tmp_path)
    assert path == tmp_path / FILE and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_central_evaluation_rows(small_config):
    from fedrec.server.core import initial_tables
    from fedrec.shared.data.population import open_population

    assert CentralEvaluation.for_run(small_config, simulated=True) is None  # off by default
    config = small_config.replace(central_eval_every=2)
    assert CentralEvaluation.for_run(config, simulated=False) is None  # a deployed server has no device data
    evaluation = CentralEvaluation.for_run(config, simulated=True)
    assert [r for r in range(1, config.rounds + 1) if evaluation.due(r)] == [2, 3]  # every 2, and the last
    row = evaluation.row(2, initial_tables(config, open_population(config).catalogue()))
    assert row["kind"] == KIND and row["round"] == 2 and row["devices"] == config.devices
    assert 0.0 <= row["hr@10"] <= 1.0 and 0.0 <= row["ndcg@10"] <= row["hr@10"]


def test_noised_federated_metrics_are_marked_in_the_table():
    summary = {"dp": True, "metrics": {"hr@10": 0.1, "ndcg@10": 0.05, "recall@20": 0.2, "coverage@10": None},
               "baselines": {}, "federated_eval": {"noise_stderr": 0.0123}, "dataset": "synthetic", "devices": 12,
               "items": 40, "rounds": 3, "privacy": {"record_level": {"delta": 1e-5}, "mode": "local"},
               "run_dir": "x", "seconds": {"total": 1.0}}
    table = format_table(summary)
    assert "federated + DP *" in table and "noise std of each mean 0.0123" in table
    table = format_table({**summary, "baselines": {"random": {"hr@10": 0.01}}})
    assert "*" not in table.split("\n")[3]
    # baselines off: the model's row stays (noised), and the last central evaluation is its own row, without noise
    central = {"kind": KIND, "round": 3, "hr@10": 0.4321, "ndcg@10": 0.2, "recall@20": 0.5, "coverage@10": 0.9}
    lines = format_table(summary, central=central).split("\n")
    assert lines[3].startswith("federated + DP *") and lines[4].startswith("federated, central")
    assert "0.4321" in lines[4] and any("after round 3" in line for line in lines)
    import pandas as pd

    from fedrec.simulation.learning_curve import last_central_evaluation

    frame = pd.DataFrame.from_records([*ROWS, central])
    assert last_central_evaluation(frame)["hr@10"] == 0.4321 and last_central_evaluation(frame[:2]) is not None
    assert last_central_evaluation(frame[1:3]) is None


@pytest.mark.usefixtures("server_process_identity")
def test_a_simulation_writes_the_central_rows_and_the_curve(tmp_path):
    from fedrec.simulation.runner import simulate

    config = RunConfig(devices=16, synthetic_items=40, synthetic_topics=4, synthetic_mean_events=12, embedding_dim=4,
                       num_negatives=4, rounds=3, devices_per_round=8, central_eval_every=2, baselines=False,
                       simulation_shards=2, out_dir=str(tmp_path / "run"))
    simulate(config)
    rows = RunRecords(tmp_path / "run").read_jsonl(METRICS)
    central = [r for r in rows if r["kind"] == KIND]
    assert [r["round"] for r in central] == [0, 2, 3]
    assert all(np.isfinite(r["hr@10"]) for r in central)
    assert (tmp_path / "run" / FILE).exists()

"""`fedrec report` on a tiny synthetic population: every row, on the same split, written as md/csv/json/png."""

from __future__ import annotations

import csv
import json

from fedrec.simulation.cli import main as fedrec


def test_report_writes_every_row_and_file(tmp_path, capsys):
    out = tmp_path / "report"
    code = fedrec(["report", "--out", str(out), "--devices", "40", "--rounds", "3", "--devices-per-round", "20",
                   "--epsilons", "4,8", "--privacy", "local,distributed",
                   "--run-config", "synthetic-items=80 synthetic-topics=5 embedding-dim=4"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [r["model"] for r in rows] == ["random", "popularity", "central MF (no DP)", "central DP-SGD MF, eps 4",
                                          "central DP-SGD MF, eps 8", "federated (no DP)",
                                          "federated + DP (local), eps 4", "federated + DP (local), eps 8",
                                          "federated + DP (distributed), eps 4", "federated + DP (distributed), eps 8"]
    assert [r["mode"] for r in rows if r["kind"] == "federated-dp"] == ["local", "local", "distributed", "distributed"]
    for row in rows:
        assert 0.0 <= float(row["hr@10"]) <= 1.0 and row["diversity@10"] != ""
    federated = [r for r in rows if r["kind"] == "federated-dp"]
    assert all(float(r["epsilon_max"]) <= float(r["epsilon_target"]) for r in federated)
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert meta["devices"] == 40 and meta["epsilons"] == [4.0, 8.0]
    assert (out / "report.png").stat().st_size > 10_000
    assert "| federated + DP (distributed), eps 8 |" in capsys.readouterr().out

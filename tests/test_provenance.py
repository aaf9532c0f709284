"""Provenance: the versions of fedrec and its privacy-relevant dependencies, in `fedrec --version`, the ledger's first
line of each server process, summary.json and audit.json (never config.json)."""

from __future__ import annotations

import json
import platform
from importlib import metadata

import pytest

from fedrec.server.audit import audit_run
from fedrec.server.audit_report import write_audit
from fedrec.server.records import LEDGER, RunRecords
from fedrec.shared.config import RunConfig
from fedrec.shared.provenance import PACKAGES, describe, versions
from fedrec.simulation.cli import main as fedrec
from tests.conftest import read_jsonl
from tests.test_audit import write_honest_run


def test_versions_come_from_the_installed_distributions():
    found = versions()
    assert list(found) == [*PACKAGES, "python"]
    assert found["python"] == platform.python_version()
    for name in ("fedrec", "flwr", "opacus", "torch", "dp-accounting", "numpy", "cryptography"):
        assert found[name] == metadata.version(name)
    assert describe(dict(reversed(found.items()))).startswith(f"fedrec {found['fedrec']}, flwr {found['flwr']}")


def test_fedrec_version_prints_fedrec_and_its_dependencies(capsys):
    with pytest.raises(SystemExit) as exit_:
        fedrec(["--version"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"fedrec {metadata.version('fedrec')}"
    assert {line.split()[0] for line in lines[1:]} == {*PACKAGES[1:], "python"}
    assert f"  opacus {metadata.version('opacus')}" in lines


def test_the_first_ledger_line_of_each_server_process_and_the_summary_carry_the_versions(tmp_path):
    config = RunConfig(out_dir=str(tmp_path / "run"))
    records = RunRecords.open(config, resume=False)
    records.append(LEDGER, {"round": 0, "kind": "popularity"})
    records.append(LEDGER, {"round": 1, "kind": "train"})
    records.append("metrics.jsonl", {"round": 1})
    resumed = RunRecords.open(config.replace(resume=True), resume=True)  # a second server process
    resumed.append(LEDGER, {"round": 2, "kind": "train"})
    lines = read_jsonl(tmp_path / "run" / LEDGER)
    assert [line.get("provenance") for line in lines] == [versions(), None, versions()]
    assert "provenance" not in read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    resumed.write_summary({"rounds": 2})
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["provenance"] == versions()
    assert "provenance" not in json.loads((tmp_path / "run" / "config.json").read_text())
    RunConfig.load_json(tmp_path / "run" / "config.json")  # still a valid config: it rejects unknown keys


def test_the_audit_states_its_own_versions_and_the_runs(tmp_path):
    write_honest_run(tmp_path / "run", sigma=1.5, rounds=2, participation=[[0, 1], [1, 2]])
    old = audit_run(tmp_path / "run")  # a ledger written before provenance was recorded
    assert old["provenance"] == {"audit": versions(), "run": {"ledger": [], "summary": None}}
    entries = read_jsonl(tmp_path / "run" / LEDGER)
    recorded = {**versions(), "flwr": "1.41.0"}
    entries[0]["provenance"] = recorded
    (tmp_path / "run" / LEDGER).write_text("".join(json.dumps(e) + "\n" for e in entries))
    result = audit_run(tmp_path / "run")
    assert result["verdict"] == "pass"
    assert result["provenance"]["run"]["ledger"] == [{"round": 1, "kind": "train", "versions": recorded}]
    write_audit(result, tmp_path / "audit")
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["provenance"] == result["provenance"]
    markdown = (tmp_path / "audit" / "audit.md").read_text()
    assert f"- run, from its train round 1 on: {describe(recorded)}" in markdown
    assert "flwr 1.41.0" in (tmp_path / "audit" / "audit.html").read_text()

"""Every JSON file a run writes is strict JSON (no NaN or Infinity), with and without DP; the audit's files too."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedrec.server.audit import audit_run
from fedrec.server.audit_report import write_audit
from fedrec.server.records import dumps


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def strict(text: str) -> Any:
    """json.loads as a strict parser (jq, most languages) reads: NaN and Infinity are errors."""
    return json.loads(text, parse_constant=_refuse)


def parse_tree(root: Path) -> dict[str, Any]:
    """Every .json and .jsonl file under `root`, parsed strictly (a .jsonl file as its list of lines)."""
    parsed: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix == ".json":
            parsed[str(path.relative_to(root))] = strict(path.read_text(encoding="utf-8"))
        elif path.suffix == ".jsonl":
            parsed[str(path.relative_to(root))] = [strict(line) for line in path.read_text().splitlines()]
    return parsed


def test_dumps_writes_unknown_and_infinite_values_as_null():
    value = {"a": math.nan, "b": [math.inf, -math.inf, np.float32(1.5)], "c": np.array([1.0, np.nan]), "d": (1, "x")}
    assert strict(dumps(value)) == {"a": None, "b": [None, None, 1.5], "c": [1.0, None], "d": [1, "x"]}


@pytest.mark.parametrize("dp", [pytest.param(True, marks=pytest.mark.e2e), False], ids=["dp", "no-dp"])
def test_every_file_of_a_run_and_its_audit_is_strict_json(small_config, dp):
    from fedrec.simulation.runner import simulate

    # baselines=false: the summary's metrics are the federated evaluation's, where coverage@10 is unknown
    config = small_config.replace(baselines=False, federated_eval=True)
    config = config if dp else config.without_dp()
    simulate(config)
    run_dir = Path(config.out_dir)
    write_audit(audit_run(run_dir), run_dir / "audit")
    files = parse_tree(run_dir)
    assert {"config.json", "summary.json", "metrics.jsonl", "ledger.jsonl", "audit/audit.json"} <= set(files)
    assert parse_tree(Path(config.state_dir))  # the devices' state files too
    summary = files["summary.json"]
    assert summary["metrics"]["coverage@10"] is None  # unknown: null, never NaN
    record = summary["privacy"]["record_level"]
    if dp:
        assert record["epsilon_max"] > 0 and record["epsilon_unbounded"] is False
        assert all(line["epsilon_max_reported"] is not None for line in files["metrics.jsonl"]
                   if line["kind"] == "train")
    else:  # a release without DP has an infinite epsilon: null, flagged, with the reason
        assert record["epsilon_max"] is None and record["epsilon_unbounded"] is True
        assert record["devices_without_dp"] == record["devices_released"] > 0 and "not private" in record["note"]

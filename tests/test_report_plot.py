"""The report's plot and text: 95% intervals over test users, plain epsilon ticks, the federation in the title, and
report.md describing only the privacy modes that ran."""

from __future__ import annotations

import pytest

from fedrec.simulation.privacy_utility import Row, interval, write_report

META = {"dataset": "synthetic", "data_path": "", "devices": 200, "devices_available": None, "items": 80, "rounds": 5,
        "devices_per_round": 20, "delta": 1e-5, "epsilons": [1.0, 8.0], "seconds": 3.0}


def test_wilson_interval_pinned_and_conservative_normal_for_ndcg():
    low, high = interval(0.5, 100, "hr@10")
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # Wilson, 50 of 100
    low, high = interval(0.0, 100, "hr@10")
    assert low == 0.0 and high == pytest.approx(0.0370, abs=1e-4)  # none of 100: still an upper end
    low, high = interval(0.2, 400, "ndcg@10")
    assert (low, high) == pytest.approx((0.2 - 1.96 * 0.02, 0.2 + 1.96 * 0.02), abs=1e-4)


def rows(modes: list[str]) -> list[Row]:
    out = [Row("random", "baseline", metrics={"hr@10": 0.01, "ndcg@10": 0.005}),
           Row("popularity", "baseline", metrics={"hr@10": 0.1, "ndcg@10": 0.05}),
           Row("federated (no DP)", "federated", metrics={"hr@10": 0.2, "ndcg@10": 0.1})]
    for mode in modes:
        for eps in (1.0, 8.0):
            out.append(Row(f"federated + DP ({mode}), eps {eps:g}", "federated-dp", epsilon_target=eps,
                           epsilon_max=eps * 0.9, epsilon_median=eps * 0.5, mode=mode,
                           metrics={"hr@10": 0.1, "ndcg@10": 0.05}))  # equal values: the groups must not overlap
    return out


def test_report_describes_only_the_modes_that_ran(tmp_path):
    paths = write_report(rows(["distributed"]), tmp_path, title="t", meta=META)
    text = paths[0].read_text(encoding="utf-8")
    assert "distributed (record level" in text and "local (every device" not in text and "user (user level" not in text
    assert "95% intervals over the 200 test users" in text
    assert paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = write_report(rows(["local", "user"]), tmp_path, title="t", meta=META)[0].read_text(encoding="utf-8")
    assert "local (every device" in text and "user (user level" in text and "distributed (record" not in text

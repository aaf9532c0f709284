"""Ctrl-C of `fedrec simulate`, as a terminal sends it (SIGINT to the process group): one stops the run, Ray and every
child within seconds with its records consistent and says how to resume; a second stops at once; neither prints a
traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrec.simulation import procs

pytestmark = pytest.mark.e2e  # Ray starts in a subprocess: tens of seconds on a loaded 2-core machine

ROUND_LINE = "round {}/"


def start(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """A long simulation in its own process group (as a terminal's job), SIGINT at its default action."""
    run, log = tmp_path / "run", tmp_path / "out.txt"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    command = [sys.executable, "-m", "fedrec.simulation.cli", "simulate", "--devices", "30", "--rounds", "500",
               "--devices-per-round", "10", "--noise-multiplier", "1.0", "--epsilon-budget", "1000000",
               "--out", str(run), "--run-config",
               "synthetic-items=30 synthetic-topics=3 synthetic-mean-events=10 embedding-dim=4 popularity-prior=false "
               "baselines=false"]
    with open(log, "w") as out:
        # a shell's background job may have SIGINT ignored, and exec keeps that: give the child the default action
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, run, log


def wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float = 400.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"never saw {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def children(proc: subprocess.Popen) -> dict[int, str]:
    return {pid: procs.command_line(pid) for pid in procs.with_descendants([proc.pid]) - {proc.pid}}


def left_after(started: dict[int, str], timeout: float) -> list[str]:
    """The command lines of `started` still running after `timeout` s (a failure; they are then stopped)."""
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in started if procs.alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    procs.stop(left, grace=2.0)
    return [started[pid] for pid in left]


def test_one_ctrl_c_stops_ray_and_every_child_leaves_consistent_records_and_says_how_to_resume(tmp_path):
    proc, run, log = start(tmp_path)
    wait_for(proc, log, ROUND_LINE.format(2))
    started_children = children(proc)
    assert started_children, "Ray's processes should be children of the simulation"
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running 60 s after one Ctrl-C:\n{log.read_text()[-3000:]}")
    took = time.monotonic() - sent
    left = left_after(started_children, timeout=10.0)
    out = log.read_text()
    assert code == 130, out[-3000:]
    assert not left, f"processes left 10 s after the run ended: {left}"
    assert "Traceback" not in out and "ActorDiedError" not in out, out[-3000:]
    assert f"fedrec simulate --out {run} --resume" in out
    last = int(out.split("the run stopped after round ")[1].split(" ")[0])
    # consistent: the checkpoint is the last round said, and every round sent up to it has its outcome ledgered
    from fedrec.server.records import LEDGER, RunRecords

    records = RunRecords(run)
    assert records.load_checkpoint().server_round == last
    ledger = records.read_jsonl(LEDGER)
    done = {(e["kind"], e["round"]) for e in ledger if e["status"] == "done"}
    assert {(e["kind"], e["round"]) for e in ledger if e["status"] == "sent"} <= done
    assert ("train", last) in done and ("train", last + 1) not in done
    assert not (run / "summary.json").exists()
    assert "interrupted" in (run / "fedrec.log").read_text()
    print(f"one Ctrl-C: exit {code} {took:.1f}s after the signal, after round {last}")


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
    proc, run, log = start(tmp_path)
    wait_for(proc, log, ROUND_LINE.format(1))
    started_children = children(proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running 30 s after two Ctrl-C:\n{log.read_text()[-3000:]}")
    left = left_after(started_children, timeout=10.0)
    out = log.read_text()
    assert code == 130 and "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert not left, f"processes left 10 s after the run ended: {left}"
    # the records stay readable: every ledger line whole (written and fsynced one at a time)
    for line in (run / "ledger.jsonl").read_text().splitlines():
        json.loads(line)

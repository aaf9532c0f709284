"""The server's request waves on the deployed grid: its own pull interval, every reply kept, the timeout kept."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.app import Message, RecordDict
from flwr.superlink.grid.http_grid import HttpGrid

from fedrec.server import exchange

pytestmark = pytest.mark.usefixtures("server_process_identity")  # conftest.py: this test is the server process


class ScriptedGrid(HttpGrid):
    """Flower's deployed grid class with its transport replaced: reply k is ready on pull number ready[k]."""

    def __init__(self, ready: list[int | None]) -> None:  # no SuperLink: Flower's __init__ is not called
        self.ready = ready
        self.pulls: list[set[str]] = []

    def push_messages(self, messages):
        return [f"m{k}" for k, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls.append(set(message_ids))
        out = []
        for mid in sorted(message_ids):
            if self.ready[int(mid[1:])] == len(self.pulls):
                reply = Message(RecordDict(), dst_node_id=1, message_type="query")
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                out.append(reply)
        return out


@pytest.fixture
def clock(monkeypatch):
    """A fake clock that only `sleep` moves: the waits the exchange asks for, with no real waiting."""
    now = {"t": 0.0, "sleeps": []}

    def sleep(seconds):
        now["sleeps"].append(seconds)
        now["t"] += seconds

    monkeypatch.setattr(exchange, "time", SimpleNamespace(monotonic=lambda: now["t"], sleep=sleep))  # this module's
    return now


def messages(n):
    return [Message(RecordDict(), dst_node_id=k + 1, message_type="query") for k in range(n)]


def test_replies_are_pulled_at_our_interval_until_all_are_in(clock):
    grid = ScriptedGrid(ready=[1, 3, 3])
    replies = exchange.send_and_receive(grid, messages(3), timeout=60.0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert clock["sleeps"] == [exchange.DEPLOYED_PULL_INTERVAL_S] * 2  # Flower's own loop sleeps 3 s each time
    assert grid.pulls == [{"m0", "m1", "m2"}, {"m1", "m2"}, {"m1", "m2"}]  # only what is still missing


def test_the_timeout_ends_the_wave_with_the_replies_that_came(clock):
    grid = ScriptedGrid(ready=[2, None])
    replies = exchange.send_and_receive(grid, messages(2), timeout=1.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert clock["t"] == pytest.approx(1.0, abs=exchange.DEPLOYED_PULL_INTERVAL_S)


def test_other_grids_keep_their_own_loop():
    class Other:
        def send_and_receive(self, messages, timeout=None):
            return iter([("called", len(list(messages)), timeout)])

    assert exchange.send_and_receive(Other(), messages(2), timeout=5.0) == [("called", 2, 5.0)]

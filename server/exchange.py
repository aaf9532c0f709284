"""One wave of requests to the nodes: push them, then pull the replies until all are in or the timeout passes."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

# Flower 1.42's deployed grid (HttpGrid) sleeps a fixed 3 s between pulls, so every wave of a deployment (hello,
# popularity, each round, each secure-sum stage) ended on the next multiple of 3 s after its last reply: 9.6 s for a
# round of 3 devices whose replies were in after ~5 s. A pull is one call to the SuperLink on its own machine.
DEPLOYED_PULL_INTERVAL_S = 0.25


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float) -> list[Message]:
    """`grid.send_and_receive`, polling every DEPLOYED_PULL_INTERVAL_S on the deployed grid (the in-memory grid's
    interval is its own `pull_interval`, set by the ServerApp)."""
    from flwr.superlink.grid.http_grid import HttpGrid

    if not isinstance(grid, HttpGrid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(DEPLOYED_PULL_INTERVAL_S)
    return replies

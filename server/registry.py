"""Which device sits behind which Flower node, learned by a one-time hello per node.

Sampling by stable device id (not by Flower's random node ids) keeps runs reproducible
and lets the ledger name the same device across restarts.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from shared import protocol as P

log = logging.getLogger("fedrec.server")


class DeviceRegistry:
    def __init__(self, grid: Grid, *, hello_timeout: float) -> None:
        self.grid = grid
        self.hello_timeout = hello_timeout
        self.node_of: dict[str, int] = {}
        self.device_of: dict[int, str] = {}

    def wait_for(self, count: int, *, timeout: float) -> int:
        """Wait until `count` nodes are connected or `timeout` passes; returns how many are."""
        deadline = time.monotonic() + timeout
        while (connected := len(list(self.grid.get_node_ids()))) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        if connected < count:
            log.warning("only %d of %d devices connected after %.0fs; continuing with those", connected, count,
                        timeout)
        return connected

    def refresh(self) -> None:
        """Say hello to nodes not seen before, and forget nodes that left."""
        online = set(self.grid.get_node_ids())
        for node in set(self.device_of) - online:
            self.node_of.pop(self.device_of.pop(node), None)
        new = sorted(online - set(self.device_of))
        if not new:
            return
        replies = self.grid.send_and_receive(
            [Message(RecordDict(), dst_node_id=node, message_type="query") for node in new], timeout=self.hello_timeout)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d did not say hello: %s", node, reply.error.reason)
                continue
            device_id = str(reply.content[P.DEVICE][P.DEVICE_ID])
            if device_id in self.node_of and self.node_of[device_id] != node:
                log.warning("device %s moved from node %d to node %d", device_id, self.node_of[device_id], node)
                self.device_of.pop(self.node_of[device_id], None)
            self.node_of[device_id] = node
            self.device_of[node] = device_id
        log.info("%d devices known (%d new)", len(self.node_of), len(new))

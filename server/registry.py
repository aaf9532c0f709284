"""Which devices sit behind which Flower node, learned by a one-time hello per node.

A node hosts one device in deployment, or a shard of devices in a cohort simulation.
Sampling by stable device id (not by Flower's random node ids) keeps runs reproducible
and lets the ledger name the same device across restarts.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedrec.shared import protocol as P

from .exchange import send_and_receive

log = logging.getLogger("fedrec.server")


def grid_is_simulated(grid: Grid) -> bool:
    """Devices behind Flower's in-memory grid are simulated (the simulation engine); any other grid is a deployment."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


class DeviceRegistry:
    def __init__(self, grid: Grid, *, hello_timeout: float) -> None:
        self.grid = grid
        self.hello_timeout = hello_timeout
        self.node_of: dict[str, int] = {}
        self.devices_on: dict[int, list[str]] = {}
        self.duplicates: set[str] = set()  # device ids a second live node claimed

    def wait_for(self, count: int, *, timeout: float) -> int:
        """Wait until `count` devices are known (nodes connected and said hello) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if len(self.node_of) >= count or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if len(self.node_of) < count:
            log.warning("only %d of %d devices online after %.0fs; continuing with those", len(self.node_of), count,
                        timeout)
        return len(self.node_of)

    def refresh(self) -> None:
        """Say hello to nodes not seen before, and forget nodes that left."""
        online = set(self.grid.get_node_ids())
        for node in set(self.devices_on) - online:
            for device in self.devices_on.pop(node):
                self.node_of.pop(device, None)
        new = sorted(online - set(self.devices_on))
        if not new:
            return
        replies = send_and_receive(self.grid, [Message(RecordDict(), dst_node_id=node, message_type="query")
                                               for node in new], timeout=self.hello_timeout)
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise P.ProtocolError(reply.error.reason)
                devices = P.device_ids(reply.content[P.DEVICE], "hello")
            except (P.ProtocolError, KeyError) as err:
                log.warning("node %d did not say hello: %s", node, err)
                continue
            kept = []
            for device in devices:
                previous = self.node_of.get(device)
                if previous is not None and previous != node and previous in online:
                    # Two live nodes claim one device id: a device id names one participant of a secure sum, so
                    # the newcomer is left out (and flagged) rather than trusted with the same identity.
                    self.duplicates.add(device)
                    log.error("node %d claims device id %s, which node %d (still online) holds: node %d is left "
                              "out; device ids must be unique", node, device, previous, node)
                    continue
                if previous is not None and previous != node:
                    log.warning("device %s moved from node %d to node %d", device, previous, node)
                    self.devices_on[previous] = [d for d in self.devices_on.get(previous, []) if d != device]
                self.node_of[device] = node
                kept.append(device)
            self.devices_on[node] = kept
        log.info("%d devices known on %d nodes (%d new nodes)", len(self.node_of), len(self.devices_on), len(new))

    def group(self, devices: list[str]) -> dict[int, list[str]]:
        """The nodes to ask for these devices, each with its own devices in the order given."""
        asked: dict[int, list[str]] = {}
        for device in devices:
            asked.setdefault(self.node_of[device], []).append(device)
        return asked

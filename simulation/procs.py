"""Processes on this machine, read from /proc: parents, descendants, command lines, memory; a free port."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path


def parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # ended meanwhile
            out[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
    return out


def with_descendants(roots: Iterable[int], parent_of: dict[int, int] | None = None) -> set[int]:
    parent_of = parents() if parent_of is None else parent_of
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_mentioning(text: str, *, descendants: bool = False) -> list[int]:
    """PIDs (not this one) whose command line holds `text`, optionally with all their descendants."""
    parent_of = parents()
    found = {pid for pid in parent_of if pid != os.getpid() and text in command_line(pid)}
    if descendants:
        found = with_descendants(found, parent_of) - {os.getpid()}
    return sorted(found)


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # ended meanwhile, or a kernel thread


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

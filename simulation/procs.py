"""Processes on this machine through psutil (portable): parents, descendants, command lines, memory, stopping."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable

import psutil

# Command-line marks of Ray's daemons and workers (workers rename themselves 'ray::...').
RAY_TAGS = ("raylet", "gcs_server", "ray::", "default_worker.py", "ClientAppActor")
# A process that ends, or that we may not inspect, between listing and asking: skip it.
_GONE = (psutil.NoSuchProcess, psutil.AccessDenied)


def parents() -> dict[int, int]:
    """pid -> parent pid of every process we can see."""
    return {p.pid: p.info["ppid"] for p in psutil.process_iter(["ppid"]) if p.info["ppid"] is not None}


def with_descendants(roots: Iterable[int], parent_of: dict[int, int] | None = None) -> set[int]:
    """`roots` and every process below them (from one snapshot, so a process tree is judged consistently)."""
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


def _joined(cmdline: list[str] | None) -> str:
    return " ".join(cmdline or ())


def command_line(pid: int) -> str:
    """The process's arguments joined by spaces ('' if it ended or is not ours to read)."""
    try:
        return _joined(psutil.Process(pid).cmdline())
    except _GONE:
        return ""


def processes_mentioning(text: str, *, descendants: bool = False) -> list[int]:
    """PIDs (not this one) whose command line holds `text`, optionally with all their descendants."""
    me = os.getpid()
    parent_of: dict[int, int] = {}
    found: set[int] = set()
    for proc in psutil.process_iter(["ppid", "cmdline"]):  # one pass: parents and command lines together
        if proc.info["ppid"] is not None:
            parent_of[proc.pid] = proc.info["ppid"]
        if proc.pid != me and text in _joined(proc.info["cmdline"]):
            found.add(proc.pid)
    if descendants:
        found = with_descendants(found, parent_of) - {me}
    return sorted(found)


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 if it ended or is not ours to read)."""
    try:
        return psutil.Process(pid).memory_info().rss
    except _GONE:
        return 0


def _running(proc: psutil.Process) -> bool:
    try:  # is_running also checks the start time, so a reused PID is not taken for the process we asked about
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; we may not ask more


def alive(pid: int) -> bool:
    """Running: it exists and is not a zombie waiting for its parent to reap it."""
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def stop(pids: Iterable[int], grace: float = 10.0) -> list[int]:
    """Terminate `pids`, kill those still running after `grace` seconds; returns the ones that would not die."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for send in (psutil.Process.terminate, psutil.Process.kill):
        for proc in procs:
            try:
                send(proc)
            except _GONE:
                pass
        deadline = time.monotonic() + grace
        while (procs := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not procs:
            break
    return [p.pid for p in procs]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

"""A device's persistent state: user row and privacy history, serialised with a checksum, written atomically."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .model import ItemTables
from .privacy.accounting import HistoryEntry, normalize_history

STATE_FORMAT = 2
# Format 1 (before enrolled identities) accounted secure-mode releases as if the server followed the protocol,
# with keys it could substitute: against a malicious server only a device's own share protected them. Its
# states are read with that own-share history as the headline (see _migrate_format_1): charged, never dropped.
READABLE_FORMATS = (1, 2)

log = logging.getLogger("fedrec.state")


class StateError(RuntimeError):
    """Stored device state is unreadable or corrupt; the device must not train from a reset budget."""


@dataclass(frozen=True)
class DeviceState:
    """What a device keeps between rounds. Only `rounds` and `history` are ever reported (as epsilon)."""

    device_id: str
    user_row: np.ndarray | None = None  # float32 [dim]; None until the first round
    history: tuple[HistoryEntry, ...] = ()
    rounds: tuple[int, ...] = ()  # server rounds this device trained (or reported, or evaluated) in
    declined: tuple[int, ...] = field(default=())  # server rounds it declined for budget
    refused: tuple[tuple[int, str], ...] = ()  # (server round, policy rule) of every plan it refused
    non_private: bool = False  # it once released something without DP (its own policy allowed it): epsilon is inf
    # The other five figures of shared/privacy/releases.py (`history` is the record-level headline: against a
    # malicious server with c colluders; the budget is enforced on it, or on `user_history` at user level).
    subverted_history: tuple[HistoryEntry, ...] = ()  # own share (enrolment subverted)
    user_history: tuple[HistoryEntry, ...] = ()
    user_subverted_history: tuple[HistoryEntry, ...] = ()
    honest_history: tuple[HistoryEntry, ...] = ()  # honest-but-curious server
    user_honest_history: tuple[HistoryEntry, ...] = ()
    # (t, c) of every secure sum it committed to, by round: what it accounted with, for the audit
    secure_sums: tuple[tuple[int, int, int], ...] = ()
    not_user_level: bool = False  # it once made a release without a user-level guarantee: user-level epsilon inf
    # Every record-level release so far was a plain Gaussian mechanism at its listed multiplier (local mode: no secure
    # sum's Skellam noise mapped to a Gaussian through RDP), so the exact accountant applies (privacy/accounting.py).
    # False for states written before the flag existed: they keep RDP.
    gaussian_record: bool = True
    # The user row that 'user' mode fits without noise. Kept apart from `user_row` (fitted only by accounted,
    # noised steps): a record-level round must never start from a row fitted exactly to the device's data,
    # whose records would then move every example's gradient, beyond the sensitivity the accountant assumes.
    user_row_exact: np.ndarray | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "device_id": self.device_id,
            "user_row": None if self.user_row is None else [float(x) for x in self.user_row],
            "history": [list(h) for h in self.history],
            "rounds": list(self.rounds),
            "declined": list(self.declined),
            "refused": [[r, rule] for r, rule in self.refused],
            "non_private": self.non_private,
            "subverted_history": [list(h) for h in self.subverted_history],
            "user_history": [list(h) for h in self.user_history],
            "user_subverted_history": [list(h) for h in self.user_subverted_history],
            "honest_history": [list(h) for h in self.honest_history],
            "user_honest_history": [list(h) for h in self.user_honest_history],
            "secure_sums": [list(s) for s in self.secure_sums],
            "not_user_level": self.not_user_level,
            "gaussian_record": self.gaussian_record,
            "user_row_exact": None if self.user_row_exact is None else [float(x) for x in self.user_row_exact],
        }

    def to_bytes(self, *, seq: int | None = None) -> bytes:
        """The state with its checksum; `seq` (a slot's write counter, SlotStateStore) is sealed with it.

        The payload is encoded once and the document written around it, so a reader can check the
        checksum on the bytes as they lie (`_unseal`) instead of encoding the payload again.
        """
        body = _canonical(self.payload())  # never stores NaN/inf
        return _head(seq, _digest(body, seq)) + body + b"}"

    @classmethod
    def from_bytes(cls, raw: bytes, *, source: str) -> DeviceState:
        return _unseal(raw, source=source)[1]


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _digest(body: bytes, seq: int | None) -> str:
    return hashlib.sha256(body if seq is None else b"%d:" % seq + body).hexdigest()


def _head(seq: int | None, digest: str) -> bytes:
    """The document's keys before the payload, in sorted order as json.dumps(sort_keys=True) writes them."""
    counter = b"" if seq is None else b'"seq": %d, ' % seq
    return b"{" + counter + b'"sha256": "%s", "state": ' % digest.encode()


def _not_a_number(constant: str) -> None:
    raise ValueError(f"{constant} in a stored state (states are written without NaN or Infinity)")


def _unseal(raw: bytes, *, source: str) -> tuple[int | None, DeviceState]:
    """(the slot's write counter, or None for a single file; the state), checksum verified."""
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_not_a_number)
        payload, seq, digest = doc["state"], doc.get("seq"), doc["sha256"]
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
            raise ValueError(f"seq {seq!r} is not an integer")
        head = _head(seq, str(digest))
        as_written = raw.startswith(head) and raw.endswith(b"}") and _digest(raw[len(head):-1], seq) == digest
        # A file written by an earlier fedrec spaced its payload differently: check the canonical encoding.
        if not as_written and _digest(_canonical(payload), seq) != digest:
            raise StateError(f"{source}: checksum mismatch (the file was modified or truncated)")
        if payload["format"] not in READABLE_FORMATS:
            raise StateError(f"{source}: state format {payload['format']} is not one of {READABLE_FORMATS}")
        if payload["format"] == 1:
            payload = _migrate_format_1(payload)
        row, exact = payload["user_row"], payload.get("user_row_exact")
        return seq, DeviceState(
            device_id=str(payload["device_id"]),
            user_row=None if row is None else np.asarray(row, dtype=np.float32),
            user_row_exact=None if exact is None else np.asarray(exact, dtype=np.float32),
            history=tuple(normalize_history(payload["history"])),
            rounds=tuple(int(r) for r in payload["rounds"]),
            declined=tuple(int(r) for r in payload["declined"]),
            refused=tuple((int(r), str(rule)) for r, rule in payload.get("refused", [])),
            non_private=bool(payload.get("non_private", False)),
            subverted_history=tuple(normalize_history(payload["subverted_history"])),
            user_history=tuple(normalize_history(payload["user_history"])),
            user_subverted_history=tuple(normalize_history(payload["user_subverted_history"])),
            honest_history=tuple(normalize_history(payload["honest_history"])),
            user_honest_history=tuple(normalize_history(payload["user_honest_history"])),
            secure_sums=tuple((int(r), int(t), int(c)) for r, t, c in payload["secure_sums"]),
            not_user_level=bool(payload["not_user_level"]),
            gaussian_record=bool(payload.get("gaussian_record", False)))
    except StateError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, OverflowError,
            RecursionError) as err:
        raise StateError(f"{source}: unreadable device state ({type(err).__name__}: {err}); refusing to "
                         "train, since starting over would reset the privacy budget") from None


def _migrate_format_1(payload: dict[str, Any]) -> dict[str, Any]:
    """A format-1 payload in format 2's terms: its own-share histories become the headline.

    Format 1 kept (honest, subverted) histories; its secure-mode releases were made with unauthenticated keys,
    so against a malicious server only the device's own share held. The headline (where the budget is
    enforced) is therefore the old subverted history, the honest figure the old headline. Local-mode steps are
    equal in both, so a device that never joined a secure sum keeps its figure.
    """
    history = payload["history"]
    subverted = payload.get("subverted_history", history)  # a state older still kept one history
    user, user_subverted = payload.get("user_history", []), payload.get("user_subverted_history", [])
    return {**payload, "format": STATE_FORMAT, "history": subverted, "honest_history": history,
            "subverted_history": subverted, "user_history": user_subverted, "user_honest_history": user,
            "user_subverted_history": user_subverted, "secure_sums": [],
            "not_user_level": payload.get("not_user_level", bool(history))}


def atomic_write(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename it over `path`.

    The rename alone makes the write atomic for a process that dies; the flush to disk also
    covers the machine losing power.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock (flock) on `path`, held across processes until the block ends (a deployed device runs a
    fresh process per message; the lock makes load -> charge one step for each of them)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# Stores that live in one process (Context.state, memory) share this lock: it holds no data, only serialises
# load -> charge within the process, as file_lock does across processes.
_IN_PROCESS_LOCK = threading.RLock()


def in_process_lock() -> contextlib.AbstractContextManager[object]:
    return _IN_PROCESS_LOCK


class FileStateStore:
    """Device state in one file, replaced atomically and flushed to disk on every write (a deployed device)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            yield

    def load(self) -> DeviceState | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StateError(f"{self.path}: cannot read device state ({err})") from None
        return DeviceState.from_bytes(raw, source=str(self.path))

    def save(self, state: DeviceState) -> None:
        atomic_write(self.path, state.to_bytes())


class SlotStateStore:
    """A simulated device's state in two files ("slots") overwritten in place by turns: no file created per write.

    A cohort node writes about two states per device per round (the write-ahead charge, then the commit).
    Creating a temporary file and renaming it over the old one costs ~0.2 ms on an ext4 disk, overwriting a
    file in place ~0.01 ms, and at 100 devices per round the renames were most of what a Flower round cost
    beyond the training itself.

    Each write goes to the slot not holding the newest state, sealed with a write counter under its
    checksum; a load decodes both and takes the intact one with the higher counter. A write cut off part
    way (the process killed) leaves that slot damaged and the other one intact, so the device resumes from
    the state before the cut-off write, as after an atomic rename that never happened (a newer slot
    damaged any other way reads the same). A slot that cannot be read (an OSError) is a StateError, never
    passed over; so is having no intact slot: both damaged, or the only one written, which a write cut off
    during a device's very first save also leaves (the device then stops, as one with a damaged single
    file does). Not flushed to disk: a simulation has no power loss to survive. A deployed device keeps
    FileStateStore, whose cost is nothing beside its process start.
    """

    def __init__(self, folder: Path | str, device_id: str) -> None:
        # Plain strings: a node builds a store per device per round, and pathlib's parsing was a visible cost.
        self.folder, self.device_id = str(folder), device_id
        self.slots = tuple(os.path.join(self.folder, f"{device_id}.{k}.json") for k in (0, 1))
        self._seq: int | None = None  # the newest slot's counter, once loaded or saved

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        os.makedirs(self.folder, exist_ok=True)
        with file_lock(os.path.join(self.folder, f"{self.device_id}.lock")):
            self._seq = None  # another process may have written since: learn the newest slot again
            yield

    def load(self) -> DeviceState | None:
        intact: list[tuple[int, DeviceState]] = []
        damaged: list[str] = []
        for path in self.slots:
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
            except FileNotFoundError:
                continue
            except OSError as err:  # unreadable is not damaged: it may hold the newest state, so never pass it over
                raise StateError(f"{path}: cannot read device state ({err})") from None
            try:
                seq, state = _unseal(raw, source=path)
            except StateError as err:
                damaged.append(str(err))
                continue
            if seq is None or seq < 0:
                damaged.append(f"{path}: no write counter (not a slot file)")
            else:
                intact.append((seq, state))
        if intact:
            seq, state = max(intact, key=lambda found: found[0])
            if damaged:
                log.warning("device %s: a state slot is damaged (a write cut off part way?); resuming from "
                            "write %d: %s", self.device_id, seq, damaged[0])
            self._seq = seq
            return state
        if damaged:
            raise StateError(f"device {self.device_id}: no intact copy of its state ({'; '.join(damaged)})")
        # A run directory written before the slots: resume from its single file.
        state = FileStateStore(Path(self.folder) / f"{self.device_id}.json").load()
        self._seq = -1  # only once that read succeeded: a save after a failed load must not start over
        return state

    def save(self, state: DeviceState) -> None:
        if self._seq is None:
            self.load()  # learn which slot holds the newest state, so it is never the one overwritten
        assert self._seq is not None
        seq = self._seq + 1
        _overwrite(self.slots[seq % 2], state.to_bytes(seq=seq))
        self._seq = seq


def _overwrite(path: str, data: bytes) -> None:
    """Write `data` over the file's old bytes, then cut it to length (no new file, no rename)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        view, offset = memoryview(data), 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


class MemoryStateStore:
    """Device state held in memory (the plain simulation loop; lost when the process ends)."""

    def __init__(self) -> None:
        self._state: DeviceState | None = None

    def locked(self) -> contextlib.AbstractContextManager[object]:
        return _IN_PROCESS_LOCK

    def load(self) -> DeviceState | None:
        return self._state

    def save(self, state: DeviceState) -> None:
        self._state = state


def save_item_model(path: Path, tables: ItemTables, *, server_round: int) -> None:
    """The latest global item model a device received (for ranking on the device), written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, embedding=tables.embedding, bias=tables.bias, server_round=np.int64(server_round))
    atomic_write(Path(path), buffer.getvalue())


def load_item_model(path: Path) -> tuple[ItemTables, int]:
    """(item tables, the server round they came with); a missing or damaged file is a StateError."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            tables = ItemTables(embedding=data["embedding"], bias=data["bias"])
            return tables, int(data["server_round"])
    except FileNotFoundError:
        raise StateError(f"{path}: no item model yet (the device receives one in its first round)") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise StateError(f"{path}: unreadable item model ({err})") from None

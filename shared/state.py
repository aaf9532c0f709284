"""A device's persistent state: user row and privacy history, serialised with a checksum, written atomically."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .model import ItemTables
from .privacy.accounting import HistoryEntry, normalize_history

STATE_FORMAT = 1


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
    # The other three figures of shared/privacy/releases.py (`history` is the record-level, honest one).
    subverted_history: tuple[HistoryEntry, ...] = ()
    user_history: tuple[HistoryEntry, ...] = ()
    user_subverted_history: tuple[HistoryEntry, ...] = ()
    not_user_level: bool = False  # it once made a release without a user-level guarantee: user-level epsilon inf
    # The user row that 'user' mode fits without noise. Kept apart from `user_row` (fitted only by accounted,
    # noised steps): a record-level round must never start from a row fitted exactly to the device's data,
    # whose records would then move every example's gradient, beyond the sensitivity the accountant assumes.
    user_row_exact: np.ndarray | None = None

    def to_bytes(self) -> bytes:
        payload = {
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
            "not_user_level": self.not_user_level,
            "user_row_exact": None if self.user_row_exact is None else [float(x) for x in self.user_row_exact],
        }
        body = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)  # never store NaN/inf
        return json.dumps({"sha256": hashlib.sha256(body.encode()).hexdigest(), "state": payload},
                          sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, *, source: str) -> DeviceState:
        try:
            doc = json.loads(raw.decode("utf-8"))
            payload = doc["state"]
            body = json.dumps(payload, sort_keys=True, separators=(",", ":"))
            if hashlib.sha256(body.encode()).hexdigest() != doc["sha256"]:
                raise StateError(f"{source}: checksum mismatch (the file was modified or truncated)")
            if payload["format"] != STATE_FORMAT:
                raise StateError(f"{source}: state format {payload['format']} is not {STATE_FORMAT}")
            row, exact = payload["user_row"], payload.get("user_row_exact")
            return cls(device_id=str(payload["device_id"]),
                       user_row=None if row is None else np.asarray(row, dtype=np.float32),
                       user_row_exact=None if exact is None else np.asarray(exact, dtype=np.float32),
                       history=tuple(normalize_history(payload["history"])),
                       rounds=tuple(int(r) for r in payload["rounds"]),
                       declined=tuple(int(r) for r in payload["declined"]),
                       refused=tuple((int(r), str(rule)) for r, rule in payload.get("refused", [])),
                       non_private=bool(payload.get("non_private", False)),
                       # a state written before the four figures: its record history is the subverted one too
                       subverted_history=tuple(normalize_history(payload.get("subverted_history",
                                                                             payload["history"]))),
                       user_history=tuple(normalize_history(payload.get("user_history", []))),
                       user_subverted_history=tuple(normalize_history(payload.get("user_subverted_history", []))),
                       not_user_level=bool(payload.get("not_user_level", bool(payload["history"]))))
        except StateError:
            raise
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise StateError(f"{source}: unreadable device state ({type(err).__name__}: {err}); refusing to "
                             "train, since starting over would reset the privacy budget") from None


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write to a temporary file in the same folder, flush to disk (`durable`), then rename over `path`.

    The rename alone makes the write atomic for a process that dies; the flush to disk also
    covers the machine losing power.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FileStateStore:
    """Device state in one file (deployment: under the node's state-path; simulation: under the run)."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = Path(path)
        self.durable = durable  # simulation: atomic but not flushed to disk (no power loss to survive)

    def load(self) -> DeviceState | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StateError(f"{self.path}: cannot read device state ({err})") from None
        return DeviceState.from_bytes(raw, source=str(self.path))

    def save(self, state: DeviceState) -> None:
        atomic_write(self.path, state.to_bytes(), durable=self.durable)


class MemoryStateStore:
    """Device state held in memory (the plain simulation loop; lost when the process ends)."""

    def __init__(self) -> None:
        self._state: DeviceState | None = None

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

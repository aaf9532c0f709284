"""Reading behaviour logs of every common shape, in bounded memory, with errors that point at the line.

A `LogFormat` says where user, item, time, event and weight are; `read_log` streams the file in
chunks, validates each field (naming file, line and column on a problem), maps behaviour types to
weights, and keeps only compact arrays: integer codes for ids, int64 times, float32 weights.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .interactions import DataError

log = logging.getLogger("fedrec.data")

CHUNK_ROWS = 200_000
ROLES = ("user", "item", "time", "event", "weight", "category")


@dataclass(frozen=True)
class LogFormat:
    """Where each field is: a column name (with a header) or a 0-based position (without one)."""

    name: str
    columns: Mapping[str, str | int]  # role -> column; roles: user, item, time, event, weight, category
    separator: str = ","
    header: bool = True
    time_unit: str = "s"  # epoch unit of numeric times: s | ms; other text is parsed as a date
    numeric_ids: bool = False  # ids must be integers (the public data sets' own ids are)
    event_weights: Mapping[str, float] | None = None  # behaviour type -> weight; None: no event column
    parquet: bool = False
    encoding: str = "utf-8"
    log_weights: bool = False  # weights are counts: use log(1 + count)

    def __post_init__(self) -> None:
        unknown = set(self.columns) - set(ROLES)
        if unknown or "user" not in self.columns or "item" not in self.columns:
            raise DataError(f"{self.name}: columns need user and item, and roles from {ROLES}; got {dict(self.columns)}")


TAOBAO = LogFormat("taobao", {"user": 0, "item": 1, "category": 2, "event": 3, "time": 4}, header=False,
                   numeric_ids=True, event_weights={"pv": 1.0, "fav": 2.0, "cart": 2.0, "buy": 4.0})
RETAILROCKET = LogFormat("retailrocket", {"time": "timestamp", "user": "visitorid", "event": "event",
                                          "item": "itemid"}, time_unit="ms", numeric_ids=True,
                         event_weights={"view": 1.0, "addtocart": 2.0, "transaction": 4.0})


@dataclass
class RawLog:
    """A loaded log before preprocessing: compact arrays plus id tables and item metadata."""

    users: np.ndarray  # int32 codes into user_ids
    items: np.ndarray  # int32 codes into item_ids
    times: np.ndarray  # int64
    weights: np.ndarray  # float32
    user_ids: list[str]
    item_ids: list[str]
    source: str
    item_titles: dict[str, str] = field(default_factory=dict)
    item_categories: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)


class _Codes:
    """Map id strings to dense integer codes as they stream by."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.ids: list[str] = []

    def encode(self, values: np.ndarray) -> np.ndarray:
        uniques, inverse = np.unique(values, return_inverse=True)
        codes = np.empty(len(uniques), dtype=np.int32)
        for k, value in enumerate(uniques.tolist()):
            code = self.index.get(value)
            if code is None:
                code = self.index[value] = len(self.ids)
                self.ids.append(value)
            codes[k] = code
        return codes[inverse]


def parse_columns(spec: str) -> dict[str, str]:
    """`user=uid,item=sku,time=ts` -> {"user": "uid", ...} (the --columns flag)."""
    mapping = {}
    for part in [p for p in spec.split(",") if p.strip()]:
        role, sep, column = part.partition("=")
        if not sep or role.strip() not in ROLES or not column.strip():
            raise DataError(f"--columns: '{part}' should be ROLE=COLUMN with ROLE one of {ROLES}")
        mapping[role.strip()] = column.strip()
    return mapping


def parse_event_weights(spec: str) -> dict[str, float]:
    """`pv=1,cart=2,buy=4` -> weights per behaviour type (the --event-weights flag)."""
    weights = {}
    for part in [p for p in spec.split(",") if p.strip()]:
        event, sep, value = part.partition("=")
        try:
            weights[event.strip()] = float(value)
        except ValueError:
            raise DataError(f"--event-weights: '{part}' should be EVENT=NUMBER") from None
        if not sep:
            raise DataError(f"--event-weights: '{part}' should be EVENT=NUMBER")
    return weights


def read_log(path: Path, fmt: LogFormat, *, min_weight: float = 0.0, skip_bad_rows: bool = False,
             seed: int = 0) -> RawLog:
    """Stream `path` in chunks into a RawLog; rows below `min_weight` are dropped and counted.

    A log without times gets a seeded random order, so its held-out items are a random choice.
    """
    untimed = np.random.default_rng([seed, 0x7133])
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    users, items = _Codes(), _Codes()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("users", "items", "times", "weights")}
    categories: dict[str, str] = {}
    stats = {"rows_read": 0, "rows_bad": 0, "rows_below_min_weight": 0, "events": {}}
    for first_line, chunk in _chunks(path, fmt, skip_bad_rows=skip_bad_rows, stats=stats):
        frame = _select(chunk, fmt, path)
        good = _validate(frame, fmt, path, first_line, skip_bad_rows, stats)
        frame = frame[good]
        weights = _weights(frame, fmt, stats)
        keep = weights >= min_weight
        stats["rows_below_min_weight"] += int((~keep).sum())
        frame, weights = frame[keep], weights[keep]
        parts["users"].append(users.encode(frame["user"].to_numpy(str)))
        parts["items"].append(items.encode(frame["item"].to_numpy(str)))
        parts["times"].append(_times(frame, fmt) if "time" in frame else
                              untimed.integers(0, 2**62, size=len(frame), dtype=np.int64))
        parts["weights"].append(weights.astype(np.float32))
        if "category" in frame:
            categories.update(zip(frame["item"].to_numpy(str), frame["category"].to_numpy(str)))
        stats["rows_read"] += len(chunk)
    if stats["rows_bad"]:
        log.warning("%s: skipped %d malformed rows", path, stats["rows_bad"])
    if stats["rows_below_min_weight"]:
        log.info("%s: dropped %d events weaker than %g", path, stats["rows_below_min_weight"], min_weight)
    arrays = {}
    for key, dtype in (("users", np.int32), ("items", np.int32), ("times", np.int64), ("weights", np.float32)):
        arrays[key] = np.concatenate(parts.pop(key) or [np.zeros(0, dtype)]).astype(dtype, copy=False)  # lower peak
    if not len(arrays["users"]):
        raise DataError(f"{path}: no usable events ({stats['rows_read']} rows read)")
    return RawLog(users=arrays["users"], items=arrays["items"], times=arrays["times"], weights=arrays["weights"],
                  user_ids=users.ids, item_ids=items.ids, source=str(path), item_categories=categories,
                  stats={"format": fmt.name, "file_format": "parquet" if fmt.parquet else "text", **stats})


def _chunks(path: Path, fmt: LogFormat, *, skip_bad_rows: bool = False,
            stats: dict[str, Any] | None = None) -> Iterator[tuple[int, pd.DataFrame]]:
    """(1-based file line of the chunk's first row - for Parquet its row -, chunk) with every field as text.

    With `skip_bad_rows`, text rows with more fields than the header are dropped and counted in stats['rows_bad'].
    """
    if fmt.parquet:
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a damaged or non-parquet file
            raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
        frame = frame.astype(str).where(frame.notna(), "")
        for start in range(0, len(frame), CHUNK_ROWS):
            yield start + 1, frame.iloc[start:start + CHUNK_ROWS]
        return
    _check_text(path, fmt)
    try:
        reader = pd.read_csv(path, sep=fmt.separator, header=0 if fmt.header else None, dtype=str,
                             keep_default_na=False, chunksize=CHUNK_ROWS, encoding=fmt.encoding,
                             engine="python" if len(fmt.separator) > 1 else "c",
                             on_bad_lines="warn" if skip_bad_rows else "error")
        line = 2 if fmt.header else 1
        while True:
            with warnings.catch_warnings(record=True) as caught:  # pandas reports each row it skips as a warning
                warnings.simplefilter("always", pd.errors.ParserWarning)
                chunk = next(reader, None)
            skipped = sum(len(_SKIPPED.findall(str(w.message))) for w in caught)
            if stats is not None and skipped:
                stats["rows_bad"] += skipped
                stats["rows_read"] += skipped
            if chunk is None:
                return
            yield line, chunk
            line += len(chunk) + skipped
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: malformed CSV ({err}); check the separator '{fmt.separator}' and quoting") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not {fmt.encoding} text ({err.reason} at byte {err.start}); pass the file's "
                        "encoding (e.g. --encoding latin-1)") from None


_SKIPPED = re.compile(r"Skipping line \d+")


def _check_text(path: Path, fmt: LogFormat) -> None:
    """Catch a wrong separator or encoding on the first line, with a hint."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    try:
        first = head.decode(fmt.encoding).splitlines()[0] if head.strip() else ""
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: line 1 is not {fmt.encoding} text ({err.reason} at byte {err.start}); pass the "
                        "file's encoding (e.g. --encoding latin-1)") from None
    needed = max((c for c in fmt.columns.values() if isinstance(c, int)), default=-1) + 1
    needed = max(needed, 2)
    if first and len(first.split(fmt.separator)) < needed:
        found = [s for s in (",", "\t", ";", "|", "::") if s != fmt.separator and s in first]
        hint = f"; it contains {found[0]!r} - is that the separator?" if found else ""
        raise DataError(f"{path}: line 1 has {len(first.split(fmt.separator))} field(s) split on {fmt.separator!r}, "
                        f"expected at least {needed}{hint}")


def _select(chunk: pd.DataFrame, fmt: LogFormat, path: Path) -> pd.DataFrame:
    selected = {}
    for role, column in fmt.columns.items():
        if isinstance(column, int):
            if column >= chunk.shape[1]:
                raise DataError(f"{path}: {role} is column {column + 1}, but rows have {chunk.shape[1]} columns")
            selected[role] = chunk.iloc[:, column]
        else:
            if column not in chunk.columns:
                if fmt.parquet:
                    raise DataError(f"{path}: no column '{column}' for {role}; its columns are {list(chunk.columns)}")
                raise DataError(f"{path}: line 1: no column '{column}' for {role}; the header has "
                                f"{list(chunk.columns)}")
            selected[role] = chunk[column]
    return pd.DataFrame(selected).reset_index(drop=True)


def _validate(frame: pd.DataFrame, fmt: LogFormat, path: Path, first_line: int, skip: bool,
              stats: dict[str, Any]) -> np.ndarray:
    """Rows whose fields are usable; the first bad one raises unless bad rows are skipped (and counted)."""
    good = np.ones(len(frame), dtype=bool)
    problems: list[tuple[int, str, str, str]] = []
    for role in frame.columns:
        values = frame[role].str.strip()
        frame[role] = values
        empty = (values == "").to_numpy()
        if role != "category" and empty.any():
            problems.append((int(empty.argmax()), role, "", "a value"))
            good &= ~empty
        if role in ("user", "item") and fmt.numeric_ids:
            bad = ~values.str.fullmatch(r"-?\d+").to_numpy() & ~empty
            if bad.any():
                problems.append((int(bad.argmax()), role, values.iloc[int(bad.argmax())], "an integer id"))
                good &= ~bad
        if role == "weight":
            numbers = pd.to_numeric(values, errors="coerce").to_numpy()
            bad = (~np.isfinite(numbers) | (numbers < 0)) & ~empty
            if bad.any():
                problems.append((int(bad.argmax()), role, values.iloc[int(bad.argmax())], "a number >= 0"))
                good &= ~bad
        if role == "event" and fmt.event_weights is not None:
            bad = ~values.isin(list(fmt.event_weights)).to_numpy() & ~empty
            if bad.any():
                problems.append((int(bad.argmax()), role, values.iloc[int(bad.argmax())],
                                 f"one of {sorted(fmt.event_weights)} (or set --event-weights)"))
                good &= ~bad
        if role == "time":
            bad = _bad_times(values, fmt) & ~empty
            if bad.any():
                problems.append((int(bad.argmax()), role, values.iloc[int(bad.argmax())],
                                 f"a timestamp (epoch {fmt.time_unit} or a date)"))
                good &= ~bad
    if problems and not skip:
        row, role, found, expected = min(problems)
        column = fmt.columns[role]
        where = f"column '{column}'" if isinstance(column, str) else f"column {column + 1}"
        unit = "row" if fmt.parquet else "line"  # a Parquet file has rows, numbered from 1, not lines
        raise DataError(f"{path}: {unit} {first_line + row}, {where} ({role}): found {found!r}, expected {expected}"
                        "; fix the file or pass --skip-bad-rows to drop such rows (they are counted)")
    stats["rows_bad"] += int((~good).sum())
    return good


def _bad_times(values: pd.Series, fmt: LogFormat) -> np.ndarray:
    numeric = pd.to_numeric(values, errors="coerce")
    text = numeric.isna().to_numpy()
    bad = np.zeros(len(values), dtype=bool)
    if text.any():
        parsed = pd.to_datetime(values[text], errors="coerce", utc=True, format="mixed")
        bad[text] = parsed.isna().to_numpy()
    return bad


def _times(frame: pd.DataFrame, fmt: LogFormat) -> np.ndarray:
    numeric = pd.to_numeric(frame["time"], errors="coerce")
    out = np.zeros(len(frame), dtype=np.int64)
    is_number = numeric.notna().to_numpy()
    scale = 1000 if fmt.time_unit == "ms" else 1
    out[is_number] = (numeric[is_number].to_numpy(np.float64) // scale).astype(np.int64)
    if (~is_number).any():
        parsed = pd.to_datetime(frame["time"][~is_number], utc=True, format="mixed")
        out[~is_number] = ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
    return out


def _weights(frame: pd.DataFrame, fmt: LogFormat, stats: dict[str, Any]) -> np.ndarray:
    weights = np.ones(len(frame), dtype=np.float64)
    if "weight" in frame:
        weights = pd.to_numeric(frame["weight"]).to_numpy(np.float64)
        if fmt.log_weights:
            weights = np.log1p(weights)
    if "event" in frame and fmt.event_weights is not None:
        events = frame["event"].to_numpy(str)
        for event, count in zip(*np.unique(events, return_counts=True)):
            stats["events"][str(event)] = stats["events"].get(str(event), 0) + int(count)
        weights = weights * np.array([fmt.event_weights[e] for e in events], dtype=np.float64)
    return weights


def csv_format(columns: Mapping[str, str], *, separator: str = ",", event_weights: Mapping[str, float] | None = None,
               parquet: bool = False, encoding: str = "utf-8") -> LogFormat:
    if "event" in columns and event_weights is None:
        raise DataError("--columns maps an event column: give --event-weights (e.g. view=1,buy=4)")
    return LogFormat("csv", dict(columns), separator=separator, event_weights=event_weights, parquet=parquet,
                     encoding=encoding)


def counts_format(path: Path) -> LogFormat:
    """user, item, count per line (e.g. Last.fm user_artists.dat); separator and header detected."""
    with open(path, "rb") as fh:
        first = fh.read(4096).decode("utf-8", errors="replace").splitlines()
    line = first[0] if first else ""
    separator = "\t" if "\t" in line else ("," if "," in line else " ")
    header = bool(line) and not line.split(separator)[0].strip().lstrip("-").isdigit()
    return LogFormat("counts", {"user": 0, "item": 1, "weight": 2}, separator=separator, header=header,
                     log_weights=True)


def with_weights(fmt: LogFormat, event_weights: Mapping[str, float] | None) -> LogFormat:
    return fmt if event_weights is None else replace(fmt, event_weights=dict(event_weights))


def read_text_table(path: Path, **kwargs: Any) -> pd.DataFrame:
    """A small metadata table (titles, categories); missing file -> empty frame."""
    if not Path(path).exists():
        return pd.DataFrame()
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError, io.UnsupportedOperation) as err:
        raise DataError(f"{path}: cannot parse ({type(err).__name__}: {err})") from None

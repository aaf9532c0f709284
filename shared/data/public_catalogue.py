"""The operator's public catalogue, built from item metadata alone (ids, titles, categories): no one's log."""

from __future__ import annotations

import csv
from pathlib import Path

from .catalogue import Catalogue
from .interactions import DataError
from .prepare import _natural_key  # the same item order as `fedrec prepare`

METADATA_ROLES = ("item", "title", "category")


def parse_metadata_columns(spec: str) -> dict[str, str]:
    """`item=movieId,title=title,category=genres` -> {role: column}; item is required."""
    columns: dict[str, str] = {}
    for part in [p for p in spec.split(",") if p.strip()]:
        role, sep, column = part.partition("=")
        if not sep or role.strip() not in METADATA_ROLES or not column.strip():
            raise DataError(f"--columns: '{part}' should be ROLE=COLUMN with ROLE one of {METADATA_ROLES}")
        columns[role.strip()] = column.strip()
    if "item" not in columns:
        raise DataError(f"--columns {spec!r}: name the item id column (item=COLUMN)")
    return columns


def read_item_metadata(path: Path, columns: dict[str, str], *, separator: str = ",",
                       encoding: str = "utf-8") -> Catalogue:
    """A Catalogue from a CSV of item metadata with a header; items in prepare's order (numeric ids by value).

    Errors name the file, line and column: a missing column, an empty or repeated item id.
    """
    path = Path(path)
    ids: list[str] = []
    titles: dict[str, str] = {}
    categories: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        with open(path, newline="", encoding=encoding) as fh:
            reader = csv.reader(fh, delimiter=separator)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: the file is empty (expected a header naming {sorted(columns.values())})")
            header = [h.strip() for h in header]
            where = {}
            for role, column in columns.items():
                if column not in header:
                    raise DataError(f"{path}: line 1: no column '{column}' for {role}; the header has {header}")
                where[role] = header.index(column)
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) < len(header):
                    raise DataError(f"{path}: line {line}: {len(row)} fields, expected {len(header)} (split on "
                                    f"{separator!r}; check the separator and quoting)")
                item = row[where["item"]].strip()
                if not item:
                    raise DataError(f"{path}: line {line}, column '{columns['item']}' (item): found '', expected "
                                    "an item id")
                if item in first_line:
                    raise DataError(f"{path}: line {line}, column '{columns['item']}' (item): item id {item!r} "
                                    f"repeats line {first_line[item]}; one row per item")
                first_line[item] = line
                ids.append(item)
                if "title" in where:
                    titles[item] = row[where["title"]].strip()
                if "category" in where:
                    categories[item] = row[where["category"]].strip()
    except OSError as err:
        raise DataError(f"{path}: cannot read the item metadata ({err})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not {encoding} text ({err.reason} at byte {err.start}); pass the file's "
                        "encoding (e.g. --encoding latin-1)") from None
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV ({err})") from None
    if not ids:
        raise DataError(f"{path}: no items (only a header)")
    ordered = sorted(ids, key=_natural_key)
    return Catalogue(item_ids=tuple(ordered),
                     titles=tuple(titles[i] for i in ordered) if any(titles.values()) else None,
                     categories=tuple(categories[i] for i in ordered) if any(categories.values()) else None)

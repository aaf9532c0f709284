"""The public item catalogue: item index <-> original id, with titles and categories when known."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .interactions import DataError

CATALOGUE_COLUMNS = ("item_index", "item_id", "title", "category")


def read_our_csv(path: Path, header: tuple[str, ...], what: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, row) of a UTF-8 CSV this project wrote, after checking its header."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            found = next(reader, None)
            if found is None or tuple(found) != header:
                raise DataError(f"{path}: line 1: expected header {','.join(header)}, got {found}")
            yield from enumerate(reader, start=2)
    except OSError as err:
        raise DataError(f"{path}: cannot read {what} ({err})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 ({err})") from None


@dataclass(frozen=True)
class Catalogue:
    item_ids: tuple[str, ...]
    titles: tuple[str, ...] | None = None
    categories: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("titles", "categories"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.item_ids):
                raise DataError(f"catalogue: {len(values)} {name} for {len(self.item_ids)} items")

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @classmethod
    def anonymous(cls, num_items: int) -> Catalogue:
        return cls(item_ids=tuple(str(i) for i in range(num_items)))

    def label(self, index: int) -> str:
        return self.titles[index] if self.titles and self.titles[index] else f"item {self.item_ids[index]}"

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CATALOGUE_COLUMNS)
            for i, item_id in enumerate(self.item_ids):
                writer.writerow([i, item_id, self.titles[i] if self.titles else "",
                                 self.categories[i] if self.categories else ""])

    @classmethod
    def read_csv(cls, path: Path) -> Catalogue:
        ids, titles, categories = [], [], []
        for line, row in read_our_csv(path, CATALOGUE_COLUMNS, "the catalogue"):
            if len(row) != len(CATALOGUE_COLUMNS) or row[0] != str(line - 2):
                raise DataError(f"{path}: line {line}: expected item_index {line - 2} and 4 columns, got {row}")
            ids.append(row[1])
            titles.append(row[2])
            categories.append(row[3])
        return cls(item_ids=tuple(ids), titles=tuple(titles) if any(titles) else None,
                   categories=tuple(categories) if any(categories) else None)

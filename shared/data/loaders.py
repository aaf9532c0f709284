"""The data sets `--dataset` names, each read through shared/data/formats.py into a RawLog."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import RunConfig
from .formats import (
    RETAILROCKET,
    TAOBAO,
    LogFormat,
    RawLog,
    counts_format,
    csv_format,
    parse_columns,
    parse_event_weights,
    read_log,
    read_text_table,
)
from .interactions import DataError

log = logging.getLogger("fedrec.data")

MOVIELENS = {
    "latest": ("ratings.csv", LogFormat("movielens-latest", {"user": "userId", "item": "movieId", "time": "timestamp"},
                                        numeric_ids=True)),
    "1m": ("ratings.dat", LogFormat("movielens-1m", {"user": 0, "item": 1, "time": 3}, separator="::", header=False,
                                    numeric_ids=True, encoding="latin-1")),
    "100k": ("u.data", LogFormat("movielens-100k", {"user": 0, "item": 1, "time": 3}, separator="\t", header=False,
                                 numeric_ids=True)),
}
MOVIELENS_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
                    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                    "War", "Western"]


@dataclass(frozen=True)
class LoadOptions:
    """What the user can say about a file beyond its data set's standard shape."""

    columns: dict[str, str] | None = None  # csv: role -> column
    separator: str = ","
    encoding: str | None = None
    event_weights: dict[str, float] | None = None  # behaviour type -> weight (overrides the data set's)
    min_weight: float = 0.0  # drop events weaker than this (e.g. 4: purchases only, with buy=4)
    skip_bad_rows: bool = False
    seed: int = 0


def _file_in(path: Path, names: list[str], dataset: str) -> Path:
    path = Path(path)
    if path.is_file():
        return path
    for name in names:
        if (path / name).exists():
            return path / name
    raise DataError(f"{path}: no {dataset} file here (expected {' or '.join(names)}, or pass the file itself)")


def _read(path: Path, fmt: LogFormat, options: LoadOptions) -> RawLog:
    if options.encoding:
        fmt = replace(fmt, encoding=options.encoding)
    if options.event_weights is not None:
        fmt = replace(fmt, event_weights=dict(options.event_weights))
    return read_log(path, fmt, min_weight=options.min_weight, skip_bad_rows=options.skip_bad_rows, seed=options.seed)


def load_movielens(path: Path, options: LoadOptions = LoadOptions()) -> RawLog:
    """MovieLens latest (ratings.csv), 1M (ratings.dat) or 100K (u.data); every rating is a positive."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    found = [(v, folder / f) for v, (f, _) in MOVIELENS.items()
             if (folder / f).exists() and (path.is_dir() or path.name == f)]
    if not found:
        raise DataError(f"{path}: no MovieLens ratings file (expected ratings.csv, ratings.dat or u.data)")
    variant, ratings = found[0]
    log.info("reading MovieLens %s from %s", variant, ratings)
    raw = _read(ratings, MOVIELENS[variant][1], options)
    if variant == "latest":
        movies = read_text_table(folder / "movies.csv")
        if not movies.empty:
            raw.item_titles = dict(zip(movies["movieId"], movies["title"]))
            raw.item_categories = dict(zip(movies["movieId"], movies["genres"]))
    elif variant == "1m":
        movies = read_text_table(folder / "movies.dat", sep="::", header=None, engine="python", encoding="latin-1")
        if not movies.empty:
            raw.item_titles = dict(zip(movies[0], movies[1]))
            raw.item_categories = dict(zip(movies[0], movies[2]))
    else:
        movies = read_text_table(folder / "u.item", sep="|", header=None, encoding="latin-1")
        if not movies.empty:
            flags = movies.iloc[:, 5:5 + len(MOVIELENS_GENRES)]
            raw.item_titles = dict(zip(movies[0], movies[1]))
            raw.item_categories = {item: "|".join(g for g, f in zip(MOVIELENS_GENRES, row) if f == "1")
                                   for item, row in zip(movies[0], flags.itertuples(index=False))}
    return raw


def load_taobao(path: Path, options: LoadOptions = LoadOptions()) -> RawLog:
    """Taobao UserBehavior: user_id,item_id,category_id,behavior_type,timestamp; no header; pv/cart/fav/buy."""
    return _read(_file_in(path, ["UserBehavior.csv"], "Taobao UserBehavior"), TAOBAO, options)


def load_retailrocket(path: Path, options: LoadOptions = LoadOptions()) -> RawLog:
    """RetailRocket events.csv: timestamp,visitorid,event,itemid,transactionid; view/addtocart/transaction."""
    return _read(_file_in(path, ["events.csv"], "RetailRocket"), RETAILROCKET, options)


def load_counts(path: Path, options: LoadOptions = LoadOptions()) -> RawLog:
    """user, item, count per line (e.g. Last.fm user_artists.dat); weight log(1 + count); no times."""
    file = _file_in(path, ["user_artists.dat"], "counts")
    return _read(file, counts_format(file), options)


def load_csv(path: Path, options: LoadOptions = LoadOptions()) -> RawLog:
    """Any CSV or Parquet file with a column mapping (--columns user=...,item=...,time=...,event=...,weight=...)."""
    if not options.columns:
        raise DataError("--dataset csv needs --columns (at least user=COLUMN,item=COLUMN)")
    path = Path(path)
    parquet = path.suffix.lower() in (".parquet", ".pq")
    fmt = csv_format(options.columns, separator=options.separator, event_weights=options.event_weights,
                     parquet=parquet, encoding=options.encoding or "utf-8")
    return _read(path, fmt, replace(options, event_weights=None))


LOADERS = {"movielens": load_movielens, "taobao": load_taobao, "retailrocket": load_retailrocket,
           "counts": load_counts, "csv": load_csv}


def load_options(config: RunConfig) -> LoadOptions:
    separator = {"\\t": "\t", "tab": "\t"}.get(config.separator, config.separator)
    return LoadOptions(columns=parse_columns(config.columns) if config.columns else None, separator=separator,
                       encoding=config.encoding or None,
                       event_weights=parse_event_weights(config.event_weights) if config.event_weights else None,
                       min_weight=config.min_weight, skip_bad_rows=config.skip_bad_rows, seed=config.seed)


def load_dataset(config: RunConfig) -> RawLog:
    """Read the raw data set a RunConfig names (any of LOADERS)."""
    if config.dataset not in LOADERS:
        raise DataError(f"dataset '{config.dataset}' is not a raw format; expected one of {sorted(LOADERS)}")
    return LOADERS[config.dataset](Path(config.data_path), load_options(config))

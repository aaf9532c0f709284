"""Readers for public recommender data sets; each returns a RawLog or raises DataError naming the problem."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .interactions import DataError
from .prepare import RawLog

log = logging.getLogger("fedrec.data")


def load_movielens(path: Path) -> RawLog:
    """MovieLens 100K (u.data), 1M (ratings.dat) or latest (ratings.csv); every rating is a positive."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    candidates = [("latest", folder / "ratings.csv"), ("1m", folder / "ratings.dat"), ("100k", folder / "u.data")]
    if path.is_file():
        candidates = [(v, p) for v, p in candidates if p.name == path.name]
    found = [(v, p) for v, p in candidates if p.exists()]
    if not found:
        raise DataError(f"{path}: no MovieLens ratings file (expected ratings.csv, ratings.dat or u.data)")
    variant, ratings = found[0]
    log.info("reading MovieLens %s from %s", variant, ratings)
    if variant == "latest":
        df = _read(ratings, sep=",", header=0, names=None)
        _require_columns(df, ratings, ("userId", "movieId", "rating", "timestamp"))
        df = df.rename(columns={"userId": "user", "movieId": "item", "timestamp": "time"})
        titles, genres = _movies_csv(folder / "movies.csv")
    elif variant == "1m":
        df = _read(ratings, sep="::", header=None, names=["user", "item", "rating", "time"], engine="python")
        titles, genres = _movies_dat(folder / "movies.dat")
    else:
        df = _read(ratings, sep="\t", header=None, names=["user", "item", "rating", "time"])
        titles, genres = _u_item(folder / "u.item")
    for column in ("user", "item", "time"):
        numeric = pd.to_numeric(df[column], errors="coerce")
        bad = numeric.isna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{ratings}: row {row + 1}: column '{column}' = {df[column].iloc[row]!r} is not a number")
        df[column] = numeric.astype("int64")
    events = pd.DataFrame({"user": df["user"].astype(str), "item": df["item"].astype(str),
                           "time": df["time"].astype("int64"), "weight": 1.0})
    events["weight"] = events["weight"].astype("float32")
    return RawLog(events=events, source=str(ratings), item_titles=titles, item_categories=genres,
                  stats={"format": f"movielens-{variant}"})


def _read(path: Path, **kwargs) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, **kwargs)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: cannot parse ({type(err).__name__}: {err})") from None
    if df.empty:
        raise DataError(f"{path}: the file holds no rows")
    return df


def _require_columns(df: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: line 1: missing column(s) {missing}; found {list(df.columns)}")


def _movies_csv(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    if not path.exists():
        return {}, {}
    df = _read(path, sep=",", header=0, dtype=str)
    return dict(zip(df["movieId"], df["title"])), dict(zip(df["movieId"], df["genres"]))


def _movies_dat(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    if not path.exists():
        return {}, {}
    df = _read(path, sep="::", header=None, names=["item", "title", "genres"], engine="python", dtype=str,
               encoding="latin-1")
    return dict(zip(df["item"], df["title"])), dict(zip(df["item"], df["genres"]))


def _u_item(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    if not path.exists():
        return {}, {}
    df = _read(path, sep="|", header=None, dtype=str, encoding="latin-1")
    genre_names = ["unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
                   "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                   "Thriller", "War", "Western"]
    flags = df.iloc[:, 5:5 + len(genre_names)]
    genres = ["|".join(g for g, f in zip(genre_names, row) if f == "1") for row in flags.itertuples(index=False)]
    return dict(zip(df[0], df[1])), dict(zip(df[0], genres))


LOADERS = {"movielens": load_movielens}

"""Data: the time-ordered split, the synthetic generator, prepared folders and the MovieLens reader."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedrec.shared.config import RunConfig
from fedrec.shared.data.interactions import DataError, DeviceEvents, split_device
from fedrec.shared.data.loaders import load_movielens
from fedrec.shared.data.population import open_population, population_splits
from fedrec.shared.data.prepare import prepare_log, read_device_file
from fedrec.shared.data.prepared import PreparedData
from fedrec.shared.data.synthetic import SyntheticSpec


def events(items, times, weights=None):
    weights = np.ones(len(items), np.float32) if weights is None else np.asarray(weights, np.float32)
    return DeviceEvents(np.asarray(items, np.int64), np.asarray(times, np.int64), weights)


def test_split_holds_out_the_last_two_new_items_by_time():
    split = split_device(events([5, 3, 9, 1, 7], [50, 10, 40, 20, 30]))
    assert split.train_items.tolist() == [3, 1, 7]
    assert (split.val_item, split.test_item) == (9, 5)


def test_split_keeps_first_occurrence_and_strongest_weight():
    # item 3 comes back later with a stronger event: it stays a training item, weight 2
    split = split_device(events([3, 4, 3, 6, 8], [1, 2, 3, 4, 5], [1, 1, 2, 1, 1]))
    assert split.train_items.tolist() == [3, 4]
    assert split.train_weights.tolist() == [2.0, 1.0]
    assert (split.val_item, split.test_item) == (6, 8)


def test_split_needs_three_distinct_items():
    assert split_device(events([1, 1, 2], [1, 2, 3])) is None


def test_synthetic_is_deterministic_and_per_device():
    spec = SyntheticSpec(num_devices=50, num_items=80, num_topics=5, mean_events=10, popularity_skew=1.0,
                         taste_share=0.8, seed=3)
    again = dataclasses.replace(spec)
    for k in (0, 17, 49):
        a, b = spec.device_events(k), again.device_events(k)
        assert np.array_equal(a.items, b.items) and np.array_equal(a.times, b.times)
        assert len(np.unique(a.items)) == len(a.items) >= 5
        assert np.all(np.diff(a.times) > 0)
    other_seed = dataclasses.replace(spec, seed=4)
    assert not np.array_equal(spec.device_events(0).items, other_seed.device_events(0).items)


def test_synthetic_has_popularity_skew_and_planted_taste():
    spec = SyntheticSpec(num_devices=400, num_items=200, num_topics=8, mean_events=20, popularity_skew=1.0,
                         taste_share=0.8, seed=0)
    counts = np.bincount(np.concatenate([spec.device_events(k).items for k in range(400)]), minlength=200)
    top = np.sort(counts)[::-1]
    assert top[:20].sum() > 1.5 * top[-100:].sum()  # the top 10% of items outweigh the bottom half
    # a device's items concentrate in its favourite topic, far more than popularity alone explains

    def favourite_share(s: SyntheticSpec) -> float:
        return float(np.mean([np.bincount(s.item_topic[s.device_events(k).items], minlength=8).max() /
                              len(s.device_events(k)) for k in range(100)]))

    assert favourite_share(spec) > 1.5 * favourite_share(dataclasses.replace(spec, taste_share=0.0))


def write_movielens_latest(folder):
    folder.mkdir()
    rows = ["userId,movieId,rating,timestamp"]
    for user in range(1, 7):
        rows += [f"{user},{item},4.0,{1000 + 10 * item + user}" for item in range(1, 8 + user)]
    rows.append("1,3,5.0,5000")  # a repeated rating: merged
    (folder / "ratings.csv").write_text("\n".join(rows) + "\n")
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(
        f'{i},"Movie {i}, The (2000)",Drama|Comedy\n' for i in range(1, 15)))


def test_movielens_latest_is_prepared_and_read_back(tmp_path):
    write_movielens_latest(tmp_path / "ml")
    stats = prepare_log(load_movielens(tmp_path / "ml"), tmp_path / "prep", dataset="movielens")
    assert stats["duplicates_merged"] == 1 and stats["devices"] == 6 and stats["items"] == 13
    prepared = PreparedData(tmp_path / "prep")
    catalogue = prepared.catalogue()
    assert catalogue.item_ids[:3] == ("1", "2", "3") and catalogue.titles[0] == "Movie 1, The (2000)"
    assert catalogue.categories[0] == "Drama|Comedy"
    first = prepared.device_events(0)
    assert sorted(catalogue.item_ids[i] for i in first.items) == sorted(str(i) for i in range(1, 9))
    # the device's own file holds the same events, and nothing of anyone else
    own = read_device_file(tmp_path / "prep" / "devices" / "0.csv", num_items=catalogue.num_items)
    assert sorted(own.items.tolist()) == sorted(first.items.tolist())
    config = RunConfig(dataset="prepared", data_path=str(tmp_path / "prep"), devices=0)
    splits = population_splits(open_population(config))
    assert len(splits) == 6 and all(len(s.train_items) >= 3 for s in splits)


def test_movielens_1m_and_100k_formats(tmp_path):
    one_m = tmp_path / "ml-1m"
    one_m.mkdir()
    (one_m / "ratings.dat").write_text("".join(f"{u}::{i}::5::{100 * i + u}\n" for u in (1, 2) for i in range(1, 7)))
    assert len(load_movielens(one_m)) == 12
    hundred_k = tmp_path / "ml-100k"
    hundred_k.mkdir()
    (hundred_k / "u.data").write_text("".join(f"{u}\t{i}\t3\t{100 * i}\n" for u in (1, 2) for i in range(1, 6)))
    (hundred_k / "u.item").write_bytes("1|Caf\xe9 (1995)|01-Jan-1995||http://x|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
                                       .encode("latin-1"))
    raw = load_movielens(hundred_k)
    assert raw.item_titles["1"] == "Café (1995)" and raw.item_categories["1"] == "Action"


def test_prepared_folder_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="not found; is .* a folder written by 'fedrec prepare'"):
        PreparedData(tmp_path)

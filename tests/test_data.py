"""Data: the time-ordered split, the synthetic generator, prepared folders and the MovieLens reader."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fedrec.shared.config import RunConfig
from fedrec.shared.data.interactions import DataError, DeviceEvents, split_device
from fedrec.shared.data.loaders import load_movielens
from fedrec.shared.data.population import SyntheticPopulation, open_catalogue, open_population, population_splits
from fedrec.shared.data.prepare import prepare_log, read_device_file
from fedrec.shared.data.prepared import SERVER_MANIFEST_KEYS, PreparedData, read_server_folder
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


def test_prepare_writes_a_server_folder_with_the_catalogue_and_nothing_per_device(tmp_path):
    write_movielens_latest(tmp_path / "ml")
    prepare_log(load_movielens(tmp_path / "ml"), tmp_path / "prep", dataset="movielens")
    server = tmp_path / "prep" / "server"
    assert sorted(p.relative_to(server).as_posix() for p in server.rglob("*")) == ["catalogue.csv", "manifest.json"]
    manifest = json.loads((server / "manifest.json").read_text())
    assert set(manifest) <= SERVER_MANIFEST_KEYS
    assert manifest == {"format": 1, "kind": "server", "dataset": "movielens", "num_items": 13, "num_categories": 1}
    catalogue, _ = read_server_folder(server)
    assert catalogue == PreparedData(tmp_path / "prep").catalogue()
    # a simulation may still read the whole prepared folder, as before
    assert open_population(RunConfig(dataset="prepared", data_path=str(tmp_path / "prep"), devices=0)).num_devices == 6


def test_the_server_folder_refuses_anything_per_device(tmp_path):
    write_movielens_latest(tmp_path / "ml")
    prepare_log(load_movielens(tmp_path / "ml"), tmp_path / "prep", dataset="movielens")
    server = tmp_path / "prep" / "server"
    with pytest.raises(DataError, match=r"kind None, expected 'server' \(a prepared folder with every device's "
                                        r"events; give the server only .*prep/server\)"):
        read_server_folder(tmp_path / "prep")
    with pytest.raises(DataError, match=r"devices/manifest.json: not found; the server's "
                                        r"data-path must be the server folder"):
        read_server_folder(tmp_path / "prep" / "devices")  # no manifest: not a server folder
    (server / "0.csv").write_text((tmp_path / "prep" / "devices" / "0.csv").read_text())
    with pytest.raises(DataError, match=r"holds \['0.csv'\]; a server folder holds only"):
        read_server_folder(server)
    (server / "0.csv").unlink()
    manifest = json.loads((server / "manifest.json").read_text())
    (server / "manifest.json").write_text(json.dumps({**manifest, "num_devices": 6, "num_events": 60}))
    with pytest.raises(DataError, match=r"keys \['num_devices', 'num_events'\] are not allowed in a server manifest"):
        read_server_folder(server)
    (server / "manifest.json").write_text(json.dumps({**manifest, "num_items": 12}))
    with pytest.raises(DataError, match=r"num_items 12, but .*catalogue.csv lists 13 items"):
        read_server_folder(server)


def test_the_synthetic_catalogue_comes_from_the_seed_without_any_device_events(monkeypatch):
    config = RunConfig(devices=50, synthetic_items=40, synthetic_topics=4)
    expected = SyntheticPopulation(SyntheticSpec(num_devices=50, num_items=40, num_topics=4, mean_events=60,
                                                 popularity_skew=1.1, taste_share=0.9, seed=42)).catalogue()

    def no_events(*args, **kwargs):
        raise AssertionError("the catalogue must not generate a device's events")

    monkeypatch.setattr(SyntheticSpec, "device_events", no_events)
    monkeypatch.setattr(SyntheticSpec, "device_taste", no_events)
    catalogue = open_catalogue(config, deployed=True)
    assert catalogue == expected and catalogue.num_items == 40 and len(set(catalogue.categories)) == 4
    assert open_catalogue(config.replace(seed=7), deployed=True) != catalogue

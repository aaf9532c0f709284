"""Every supported input shape, and a clear error (file, line, column, found, expected) for each kind of bad input."""

from __future__ import annotations

import gzip
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fedrec.shared.config import RunConfig
from fedrec.shared.data.interactions import DataError
from fedrec.shared.data.loaders import LoadOptions, load_counts, load_csv, load_dataset, load_retailrocket, load_taobao
from fedrec.shared.data.prepare import PrepareSettings, prepare_log, read_device_file


def taobao_rows(n_users=6, n_items=9):
    rows = []
    for u in range(1, n_users + 1):
        for i in range(1, n_items + 1):
            event = ("pv", "cart", "fav", "buy")[(u + i) % 4]
            rows.append(f"{u},{100 + i},{i % 3},{event},{1511000000 + 60 * i + u}")
    return rows


def test_taobao_weights_behaviours_and_keeps_categories(tmp_path):
    path = tmp_path / "UserBehavior.csv"
    path.write_text("\n".join(taobao_rows()) + "\n")
    raw = load_taobao(tmp_path)
    behaviours = [row.split(",")[3] for row in taobao_rows()]
    assert len(raw) == 54 and raw.stats["events"] == {b: behaviours.count(b) for b in set(behaviours)}
    assert set(np.unique(raw.weights)) == {1.0, 2.0, 4.0}
    assert raw.item_categories["101"] == "1"
    purchases = load_taobao(path, LoadOptions(min_weight=4.0))
    assert len(purchases) == behaviours.count("buy")
    assert purchases.stats["rows_below_min_weight"] == 54 - behaviours.count("buy")


def test_retailrocket_millisecond_times(tmp_path):
    path = tmp_path / "events.csv"
    rows = ["timestamp,visitorid,event,itemid,transactionid"]
    rows += [f"{1433221332117 + k * 1000},{k % 3},{('view', 'addtocart', 'transaction')[k % 3]},{k % 5},"
             for k in range(30)]
    path.write_text("\n".join(rows) + "\n")
    raw = load_retailrocket(tmp_path)
    assert len(raw) == 30 and raw.times.min() == 1433221332 and raw.weights.max() == 4.0


def test_counts_use_log_weights_and_a_seeded_order(tmp_path):
    path = tmp_path / "user_artists.dat"
    path.write_text("userID\tartistID\tweight\n" + "".join(f"{u}\t{a}\t{u * a * 10}\n" for u in (2, 3) for a in
                                                           range(1, 8)))
    raw = load_counts(tmp_path)
    assert len(raw) == 14 and raw.weights.max() == pytest.approx(np.log1p(210))
    again = load_counts(tmp_path)
    assert np.array_equal(raw.times, again.times)  # no times in the file: a seeded random order


def test_csv_mapping_with_dates_and_parquet(tmp_path):
    frame = pd.DataFrame({"uid": ["a", "a", "b", "b", "b"], "sku": ["x", "y", "x", "z", "y"],
                          "ts": ["2024-01-01T10:00:00Z", "2024-01-02", "2024-01-03 08:00", "2024-01-01", "1704067200"],
                          "kind": ["view", "buy", "view", "view", "buy"]})
    frame.to_csv(tmp_path / "log.csv", sep=";", index=False)
    options = LoadOptions(columns={"user": "uid", "item": "sku", "time": "ts", "event": "kind"}, separator=";",
                          event_weights={"view": 1.0, "buy": 3.0})
    raw = load_csv(tmp_path / "log.csv", options)
    assert len(raw) == 5 and raw.times[0] == 1704103200 and raw.weights.tolist() == [1, 3, 1, 1, 3]
    frame.to_parquet(tmp_path / "log.parquet")
    parquet = load_csv(tmp_path / "log.parquet", options)
    assert np.array_equal(parquet.times, raw.times)


def test_run_config_drives_the_loader(tmp_path):
    (tmp_path / "UserBehavior.csv").write_text("\n".join(taobao_rows()) + "\n")
    config = RunConfig(dataset="taobao", data_path=str(tmp_path), event_weights="pv=1,cart=1,fav=1,buy=10",
                       min_weight=5.0)
    assert len(load_dataset(config)) == [row.split(",")[3] for row in taobao_rows()].count("buy")


BAD_INPUTS = {
    "missing column": ("uid,sku\n1,2\n", dict(columns={"user": "uid", "item": "item_id"}),
                       r"line 1: no column 'item_id' for item; the header has \['uid', 'sku'\]"),
    "empty field": ("uid,sku,ts\n1,2,100\n1,,101\n", dict(columns={"user": "uid", "item": "sku", "time": "ts"}),
                    r"line 3, column 'sku' \(item\): found '', expected a value"),
    "bad timestamp": ("uid,sku,ts\n1,2,100\n1,3,yesterday-ish\n",
                      dict(columns={"user": "uid", "item": "sku", "time": "ts"}),
                      r"line 3, column 'ts' \(time\): found 'yesterday-ish', expected a timestamp"),
    "negative weight": ("uid,sku,w\n1,2,-3\n", dict(columns={"user": "uid", "item": "sku", "weight": "w"}),
                        r"line 2, column 'w' \(weight\): found '-3', expected a number >= 0"),
    "unknown event": ("uid,sku,e\n1,2,view\n1,3,like\n", dict(columns={"user": "uid", "item": "sku", "event": "e"},
                                                              event_weights={"view": 1.0}),
                      r"line 3, column 'e' \(event\): found 'like', expected one of \['view'\]"),
    "wrong separator": ("uid;sku;ts\n1;2;100\n", dict(columns={"user": "uid", "item": "sku"}),
                        r"line 1 has 1 field\(s\) split on ',', expected at least 2; it contains ';'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_csv_input_names_line_column_and_expectation(tmp_path, case):
    text, options, message = BAD_INPUTS[case]
    path = tmp_path / "log.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_csv(path, LoadOptions(**options))


def test_non_numeric_id_in_a_numeric_format(tmp_path):
    rows = taobao_rows()
    rows[4] = "5,banana,1,pv,1511000000"
    path = tmp_path / "UserBehavior.csv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"line 5, column 2 \(item\): found 'banana', expected an integer id"):
        load_taobao(path)
    raw = load_taobao(path, LoadOptions(skip_bad_rows=True))
    assert len(raw) == len(rows) - 1 and raw.stats["rows_bad"] == 1  # skipped, and counted


def test_empty_file_and_wrong_encoding(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        load_csv(tmp_path / "empty.csv", LoadOptions(columns={"user": "u", "item": "i"}))
    (tmp_path / "latin.csv").write_bytes("u,i\nJos\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"not utf-8 text .*pass the file's encoding"):
        load_csv(tmp_path / "latin.csv", LoadOptions(columns={"user": "u", "item": "i"}))
    raw = load_csv(tmp_path / "latin.csv", LoadOptions(columns={"user": "u", "item": "i"}, encoding="latin-1"))
    assert raw.user_ids == ["José"]
    (tmp_path / "gz.csv").write_bytes(gzip.compress(b"u,i\n1,2\n"))
    with pytest.raises(DataError, match="not utf-8 text"):
        load_csv(tmp_path / "gz.csv", LoadOptions(columns={"user": "u", "item": "i"}))


def test_device_file_outside_the_catalogue(tmp_path):
    path = tmp_path / "7.csv"
    path.write_text("item_index,timestamp,weight\n3,100,1\n12,101,1\n")
    with pytest.raises(DataError, match=r"7.csv: line 3: item_index 12 is outside the catalogue of 10 items"):
        read_device_file(path, num_items=10)


def test_k_core_and_minimum_history_are_counted(tmp_path):
    rows = taobao_rows(n_users=6, n_items=9)
    rows += [f"99,{500 + k},0,pv,{1511000000 + k}" for k in range(3)]  # a device with 3 items, all unique
    (tmp_path / "UserBehavior.csv").write_text("\n".join(rows) + "\n")
    stats = prepare_log(load_taobao(tmp_path), tmp_path / "prep", dataset="taobao",
                        settings=PrepareSettings(min_user_items=5, min_item_users=2))
    assert stats["users_dropped_short_history"] == 1 and stats["items_dropped_rare"] == 3
    assert stats["devices"] == 6 and stats["items"] == 9 and stats["events_dropped_by_filters"] == 3


MEASURE = """
import resource, sys
from fedrec.shared.data.formats import TAOBAO, read_log
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
raw = read_log(sys.argv[1], TAOBAO)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(raw), (after - before) * 1024)
"""


@pytest.mark.e2e
def test_a_large_log_streams_in_bounded_memory(tmp_path):
    """1.5M rows (~50 MB): reading them must grow the process by a small multiple of the file, not 10x."""
    rng = np.random.default_rng(0)
    n = 1_500_000
    frame = pd.DataFrame({"u": rng.integers(0, 50_000, n), "i": rng.integers(0, 20_000, n),
                          "c": rng.integers(0, 100, n), "b": rng.choice(["pv", "cart", "fav", "buy"], n),
                          "t": 1511000000 + rng.integers(0, 10**6, n)})
    path = tmp_path / "big.csv"
    frame.to_csv(path, header=False, index=False)
    del frame
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True)
    rows, grown = (int(x) for x in out.stdout.split())
    size = path.stat().st_size
    assert rows == n
    assert grown < 3 * size, f"grew {grown / 2**20:.0f} MiB reading a {size / 2**20:.0f} MiB file"


def test_a_behaviour_log_trains_end_to_end(tmp_path):
    """Taobao-shaped log -> prepared folder -> federated DP rounds (the Flower-free loop) -> ranked items."""
    from fedrec.shared.data.population import open_population, population_splits
    from fedrec.shared.ranking import evaluate_with_refit
    from fedrec.simulation.plain import run_plain

    (tmp_path / "UserBehavior.csv").write_text("\n".join(taobao_rows(n_users=12, n_items=10)) + "\n")
    stats = prepare_log(load_taobao(tmp_path), tmp_path / "prep", dataset="taobao")
    config = RunConfig(dataset="prepared", data_path=str(tmp_path / "prep"), devices=0, rounds=2,
                       devices_per_round=6, embedding_dim=4, num_negatives=3)
    result = run_plain(config, engine="device")
    assert max(result.epsilon.values()) <= config.epsilon_budget
    population = open_population(config)
    metrics = evaluate_with_refit(result.tables, population_splits(population), stats["items"], l2=3.0)
    assert 0.0 <= metrics["hr@10"] <= 1.0

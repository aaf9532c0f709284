"""The popularity-curve figures used to set the synthetic generator to a real data set's shape."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.shared.config import RunConfig
from fedrec.shared.data.interactions import DeviceSplit
from fedrec.shared.data.population import open_population, population_splits
from fedrec.simulation.data_shape import main, popularity_shape


def split(items: list[int]) -> DeviceSplit:
    return DeviceSplit(np.array(items, dtype=np.int64), np.ones(len(items), dtype=np.float32), val_item=0,
                       test_item=0)


def test_figures_of_a_known_population():
    # 10 items; item 0 held by all 4 devices, item 1 by 2, items 2-5 by one each, items 6-9 by none.
    splits = [split([0, 1, 2]), split([0, 1, 3]), split([0, 4]), split([0, 5])]
    shape = popularity_shape(splits, 10)
    assert shape["devices"] == 4 and shape["items"] == 10 and shape["events_per_device"] == 10 / 4
    assert shape["top_0.1_share"] == pytest.approx(4 / 10)  # the top item
    assert shape["top_0.2_share"] == pytest.approx(6 / 10)
    assert shape["top_0.5_share"] == pytest.approx(9 / 10)
    assert shape["top_0.01_share"] == pytest.approx(4 / 10)  # at least one item
    assert shape["top_item_devices"] == 1.0 and shape["items_under_5"] == 1.0
    assert shape["median_devices_per_item"] == 1.0


def test_a_steeper_synthetic_skew_concentrates_the_curve():
    def shape(skew: float) -> dict[str, float]:
        population = open_population(RunConfig(devices=200, synthetic_items=300, synthetic_popularity_skew=skew))
        return popularity_shape(population_splits(population), population.num_items)

    flat, steep = shape(0.5), shape(1.8)
    assert steep["top_0.1_share"] > flat["top_0.1_share"] and steep["items_under_5"] > flat["items_under_5"]
    for figures in (flat, steep):
        assert 0 < figures["top_0.01_share"] <= figures["top_0.1_share"] <= figures["top_0.2_share"] <= 1


def test_the_command_prints_one_column_per_population(capsys):
    main(["--run-config", "devices=30 synthetic-items=50", "--run-config", "devices=40 synthetic-items=50"])
    out = capsys.readouterr().out
    assert "| devices | 30 | 40 |" in out and "| top_0.1_share |" in out

"""The shape of a population's popularity curve, to set the synthetic generator to a real data set's shape.

`python -m fedrec.simulation.data_shape --run-config 'dataset=prepared data-path=DIR'` and the same with synthetic
settings print the same figures side by side: how many devices and items, events per device, the share of all
training events on the top 1/10/20/50% of items, the share of devices holding the most popular item, the share of
items fewer than 5 devices hold, and the median number of devices per item.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from fedrec.shared.baselines import train_counts
from fedrec.shared.config import RunConfig
from fedrec.shared.data.interactions import DeviceSplit

SHARES = (0.01, 0.1, 0.2, 0.5)
RARE = 5  # devices: an item held by fewer is 'rare'


def popularity_shape(splits: Sequence[DeviceSplit], num_items: int) -> dict[str, float]:
    """Figures of the training events' popularity curve (one count per device and item held)."""
    counts = np.sort(train_counts(splits, num_items))[::-1]
    total = float(counts.sum())
    shape = {"devices": float(len(splits)), "items": float(num_items),
             "events_per_device": total / max(len(splits), 1)}
    for share in SHARES:
        shape[f"top_{share:g}_share"] = float(counts[: max(1, int(num_items * share))].sum()) / total if total else 0.0
    shape["top_item_devices"] = float(counts[0]) / max(len(splits), 1) if num_items else 0.0
    shape[f"items_under_{RARE}"] = float(np.mean(counts < RARE)) if num_items else 0.0
    shape["median_devices_per_item"] = float(np.median(counts)) if num_items else 0.0
    return shape


def main(argv: list[str] | None = None) -> None:
    from fedrec.shared.data.population import open_population, population_splits

    from .cli import parse_run_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", action="append", metavar="PAIRS", required=True,
                        help="one population per --run-config (keys as in `fedrec config`)")
    args = parser.parse_args(argv)
    columns = [popularity_shape(population_splits(p), p.num_items) for p in
               (open_population(RunConfig.from_mapping(parse_run_config([value]))) for value in args.run_config)]
    print("| figure | " + " | ".join(args.run_config) + " |")
    print("|---|" + "---|" * len(columns))
    for key in columns[0]:
        print(f"| {key} | " + " | ".join(f"{c[key]:,.0f}" if c[key] >= 100 else f"{c[key]:.3g}" for c in columns)
              + " |")


if __name__ == "__main__":
    main()

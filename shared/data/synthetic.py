"""Synthetic behaviour logs with planted topic preferences and Zipf popularity skew.

Each item belongs to one of T topics and has a popularity weight ``rank**-skew``. Each
device draws a taste vector over topics from a sparse Dirichlet and picks its items
without replacement from a mixture: with probability ``taste_share`` a taste-driven pick
(a topic from its taste, then an item of that topic by popularity), otherwise a
popularity-driven pick from the whole catalogue.
The catalogue structure depends on the seed alone and every device's log on
``(seed, device)``, so a simulated device can generate its own log without the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .interactions import DeviceEvents

TASTE_CONCENTRATION = 0.15  # Dirichlet alpha: most devices care about 1-3 topics
EVENT_SPREAD = 0.6  # sigma of the log-normal number of events per device
MIN_DEVICE_EVENTS = 5


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of a synthetic population; equal specs give identical data."""

    num_devices: int
    num_items: int
    num_topics: int
    mean_events: int
    popularity_skew: float
    taste_share: float
    seed: int

    @cached_property
    def item_topic(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0x17E5])
        return rng.permutation(np.arange(self.num_items) % self.num_topics)

    @cached_property
    def item_popularity(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0x909])
        ranks = rng.permutation(self.num_items) + 1.0
        pop = ranks ** (-self.popularity_skew)
        return pop / pop.sum()

    def device_taste(self, k: int) -> np.ndarray:
        rng = self._device_rng(k)
        return rng.dirichlet(np.full(self.num_topics, TASTE_CONCENTRATION))

    @cached_property
    def topic_popularity(self) -> np.ndarray:
        return np.bincount(self.item_topic, weights=self.item_popularity, minlength=self.num_topics)

    def choice_probabilities(self, k: int) -> np.ndarray:
        """P(item) for device k's next pick before removing items it already has (the planted truth)."""
        taste = self.device_taste(k)
        within_topic = self.item_popularity / self.topic_popularity[self.item_topic]
        p = (1 - self.taste_share) * self.item_popularity + self.taste_share * taste[self.item_topic] * within_topic
        return p / p.sum()

    def device_events(self, k: int) -> DeviceEvents:
        if not 0 <= k < self.num_devices:
            raise IndexError(f"synthetic device {k} outside 0..{self.num_devices - 1}")
        rng = self._device_rng(k)
        rng.dirichlet(np.full(self.num_topics, TASTE_CONCENTRATION))  # the taste, drawn first
        mu = np.log(self.mean_events) - EVENT_SPREAD**2 / 2
        n = int(np.clip(round(rng.lognormal(mu, EVENT_SPREAD)), MIN_DEVICE_EVENTS, self.num_items // 2))
        p = self.choice_probabilities(k)
        # Sequential draws without replacement = Gumbel top-n on log p (Efraimidis-Spirakis).
        keys = np.log(np.maximum(p, 1e-300)) + rng.gumbel(size=self.num_items)
        items = np.argsort(-keys)[:n].astype(np.int64)
        start = int(rng.integers(1_500_000_000, 1_600_000_000))
        times = start + np.cumsum(rng.integers(60, 86_400, size=n)).astype(np.int64)
        return DeviceEvents(items=items, times=times, weights=np.ones(n, dtype=np.float32))

    def _device_rng(self, k: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0xDE71CE, k])

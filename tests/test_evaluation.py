"""Ranking metrics on tiny inline cases with exact answers, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.shared.data.interactions import DeviceSplit
from fedrec.shared.evaluation import evaluate_population, rank_scores


def split(train, val, test):
    return DeviceSplit(np.asarray(train, np.int64), np.ones(len(train), np.float32), val, test)


def test_target_ranked_third_among_unseen():
    # item 0 and 1 are seen (excluded) despite top scores; 5 and 4 beat the target 3
    scores = np.array([[9.0, 8.0, 0.1, 0.5, 0.6, 0.7]])
    out = rank_scores(scores, [split([0], 1, 3)])
    assert out["hr@10"][0] == 1.0
    assert out["ndcg@10"][0] == pytest.approx(1 / math.log2(4))
    assert set(out["top10"][0]) == {2, 3, 4, 5, -1}  # only unseen items are recommended


def test_target_outside_top_10():
    scores = np.arange(30, dtype=float)[None, ::-1].copy()  # item 0 best ... item 29 worst
    out = rank_scores(scores, [split([0, 1], 2, 25)])  # 22 unseen items beat item 25
    assert out["hr@10"][0] == 0.0 and out["ndcg@10"][0] == 0.0 and out["recall@20"][0] == 0.0


def test_ties_count_in_expectation():
    # constant scores over 20 unseen items: the target lands in the top 10 half the time
    out = rank_scores(np.zeros((1, 23)), [split([0, 1], 2, 7)])
    assert out["hr@10"][0] == pytest.approx(10 / 20)
    assert out["recall@20"][0] == pytest.approx(1.0)
    assert out["ndcg@10"][0] == pytest.approx(sum(1 / math.log2(r + 2) for r in range(10)) / 20)


def test_validation_target_keeps_the_test_item_as_a_candidate():
    scores = np.array([[0.0, 0.0, 5.0, 9.0]])  # test item 3 is the best unseen item when validating
    out = rank_scores(scores, [split([0], 2, 3)], target="val")
    assert out["ndcg@10"][0] == pytest.approx(1 / math.log2(3))


def test_population_means_and_coverage():
    splits = [split([0], 1, 2), split([3], 4, 5)]
    scores = np.eye(12)[[2, 5]] * 10.0  # each device ranks its own test item first
    out = evaluate_population(lambda idx: scores[idx], splits, 12, sampled_seed=0)
    assert out["hr@10"] == 1.0 and out["ndcg@10"] == 1.0 and out["sampled_hr@10"] == 1.0
    assert list(out)[:4] == ["hr@10", "ndcg@10", "recall@20", "coverage@10"]
    assert 0 < out["coverage@10"] <= 1.0

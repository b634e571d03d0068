import math

import numpy as np
import pytest

from reclora_ray.ranking import chance_metrics, ranking_metrics, target_ranks


def test_ranks_and_metrics_by_hand():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.1, 0.2, 0.3]])
    target = np.array([0, 2, 0])  # ranks 1, 2, 3
    assert target_ranks(scores, target).tolist() == [1, 2, 3]
    m = ranking_metrics(scores, target, ks=(1, 5))
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3) and m["n"] == 3


def test_ties_count_against_the_target():
    assert target_ranks(np.zeros((2, 20)), np.array([0, 7])).tolist() == [20, 20]
    assert ranking_metrics(np.zeros((2, 20)), np.array([0, 7]))["hr@10"] == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="target_index outside"):
        target_ranks(np.ones((1, 3)), np.array([3]))


def test_chance_is_the_mean_of_random_orders():
    chance = chance_metrics(20)
    assert chance["hr@1"] == pytest.approx(1 / 20) and chance["hr@10"] == pytest.approx(10 / 20)
    assert chance["mrr"] == pytest.approx(sum(1 / k for k in range(1, 21)) / 20)
    assert chance["ndcg@10"] == pytest.approx(sum(1 / math.log2(k + 1) for k in range(1, 11)) / 20)
    rng = np.random.default_rng(0)  # and what random scores actually get
    sampled = ranking_metrics(rng.random((20_000, 20)), rng.integers(0, 20, 20_000))
    assert sampled["ndcg@10"] == pytest.approx(chance["ndcg@10"], abs=0.01)

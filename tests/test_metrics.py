import math

import numpy as np
import pytest

from reclora_ray.metrics import binary_metrics, rel_impr


def test_perfect_and_inverted_ranking():
    labels = np.array([0, 0, 1, 1])
    assert binary_metrics(labels, [0.1, 0.2, 0.8, 0.9])["auc"] == 1.0
    assert binary_metrics(labels, [0.9, 0.8, 0.2, 0.1])["auc"] == 0.0


def test_logloss_matches_formula_and_clips():
    labels = np.array([1, 0])
    probs = np.array([0.8, 0.3])
    expected = -(math.log(0.8) + math.log(0.7)) / 2
    assert binary_metrics(labels, probs)["logloss"] == pytest.approx(expected)
    assert math.isfinite(binary_metrics(labels, [1.0, 0.0])["logloss"])


def test_single_class_gives_nan_auc():
    assert math.isnan(binary_metrics([1, 1, 1], [0.2, 0.5, 0.9])["auc"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="equal 1-d"):
        binary_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="zero samples"):
        binary_metrics([], [])
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics([0, 1], [0.5, float("nan")])


def test_rel_impr_is_relative_auc_gain():
    assert rel_impr(0.8141, 0.8005) == pytest.approx(0.0170, abs=1e-4)  # paper Table 2, ML-1M vs ReLLa

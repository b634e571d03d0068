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


def test_user_bootstrap_resamples_users_not_rows():
    from reclora_ray.metrics import user_bootstrap

    # One user with 99 hits, 99 users with one miss each: rows say 0.5, but a resample of users
    # mostly misses the heavy user or takes it once, so the CI is wide and holds 0.5.
    values = np.r_[np.ones(99), np.zeros(99)]
    users = np.r_[np.zeros(99, dtype=int), np.arange(1, 100)]
    ci = user_bootstrap(values, users, n_boot=2000, seed=0)
    assert ci["mean"] == 0.5 and ci["n_users"] == 100
    assert ci["lo"] < 0.2 and ci["hi"] > 0.65
    same = user_bootstrap(values, users, n_boot=2000, seed=0)
    assert same == ci  # seeded
    assert user_bootstrap(np.full(50, 0.3), np.arange(50))["p_le_0"] == 0.0
    with pytest.raises(ValueError, match="equal non-empty"):
        user_bootstrap([1.0], [1, 2])

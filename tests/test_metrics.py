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


def test_user_bootstrap_draws_whole_users_with_replacement():
    from reclora_ray.metrics import user_bootstrap

    users = np.array([3, 1, 3, 2, 1, 3, 7])
    sizes = {u: int((users == u).sum()) for u in np.unique(users)}
    resamples = list(user_bootstrap(users, rounds=200, seed=0))
    assert len(resamples) == 200
    for index in resamples:
        picked, counts = np.unique(users[index], return_counts=True)
        assert all(c % sizes[u] == 0 for u, c in zip(picked, counts))  # a user comes with all its samples
    lengths = {len(index) for index in resamples}
    assert len(lengths) > 1  # the number of samples varies with the users drawn
    again = list(user_bootstrap(users, rounds=200, seed=0))
    assert all(np.array_equal(a, b) for a, b in zip(resamples, again))


def test_bootstrap_interval_covers_and_paired_test_separates():
    from reclora_ray.metrics import bootstrap_metrics, interval, paired_p_value

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(200), 10)
    taste = rng.normal(size=200)[users]  # samples of one user are correlated
    labels = (taste + rng.normal(size=len(users)) > 0).astype(int)
    good = 1 / (1 + np.exp(-(taste + 0.8 * rng.normal(size=len(users)))))
    worse = 1 / (1 + np.exp(-(taste + 2.5 * rng.normal(size=len(users)))))
    same = np.clip(good + rng.normal(scale=1e-3, size=len(users)), 0, 1)
    reps = bootstrap_metrics(labels, users, {"good": good, "worse": worse, "same": same}, rounds=300)
    lo, hi = interval(reps["good"][:, 0])
    assert lo < binary_metrics(labels, good)["auc"] < hi and hi - lo > 0.01
    assert paired_p_value(reps["good"][:, 0] - reps["worse"][:, 0]) < 0.01
    assert paired_p_value(reps["good"][:, 0] - reps["same"][:, 0]) > 0.05
    # Resampling users, not samples: the interval is wider than an i.i.d. bootstrap's would be.
    iid = bootstrap_metrics(labels, np.arange(len(users)), {"good": good}, rounds=300)["good"][:, 0]
    assert hi - lo > np.percentile(iid, 97.5) - np.percentile(iid, 2.5)


def test_bootstrap_metrics_agree_with_sklearn_on_each_resample():
    from reclora_ray.metrics import bootstrap_metrics, user_bootstrap

    rng = np.random.default_rng(1)
    users = rng.integers(0, 30, 300)
    labels = rng.integers(0, 2, 300)
    probs = np.round(rng.random(300), 1)  # many ties
    reps = bootstrap_metrics(labels, users, {"m": probs}, rounds=20, seed=3)["m"]
    expected = [binary_metrics(labels[i], probs[i]) for i in user_bootstrap(users, 20, seed=3)]
    np.testing.assert_allclose(reps[:, 0], [e["auc"] for e in expected], atol=1e-12)
    np.testing.assert_allclose(reps[:, 1], [e["logloss"] for e in expected], atol=1e-9)


def test_bootstrap_mean_resamples_users_not_rows():
    from reclora_ray.metrics import bootstrap_mean

    # One user with 99 hits, 99 users with one miss each: rows say 0.5, but a resample of users
    # mostly misses the heavy user or takes it once, so the CI is wide and holds 0.5.
    values = np.r_[np.ones(99), np.zeros(99)]
    users = np.r_[np.zeros(99, dtype=int), np.arange(1, 100)]
    ci = bootstrap_mean(values, users, rounds=2000, seed=0)
    assert ci["mean"] == 0.5 and ci["n_users"] == 100
    assert ci["lo"] < 0.2 and ci["hi"] > 0.65
    same = bootstrap_mean(values, users, rounds=2000, seed=0)
    assert same == ci  # seeded
    assert bootstrap_mean(np.full(50, 0.3), np.arange(50))["p_value"] == 1 / 1000  # never <= 0
    with pytest.raises(ValueError, match="equal non-empty"):
        bootstrap_mean([1.0], [1, 2])

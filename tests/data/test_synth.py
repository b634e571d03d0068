"""The synthetic ML-25M-format log: exact sizes, MovieLens invariants, skew, and it parses."""

import csv

import numpy as np
import pandas as pd
import pytest

from reclora_ray.data.readers import ML25M
from reclora_ray.data.synth import MIN_RATINGS_PER_USER, write_synthetic_ml25m


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_ml25m(tmp_path_factory.mktemp("synth"), n_users=1000, n_items=2000, n_rows=40_000, seed=3)


def test_sizes_and_movielens_invariants(synth):
    ratings = pd.read_csv(synth / "ratings.csv")
    assert list(ratings.columns) == ["userId", "movieId", "rating", "timestamp"]
    assert len(ratings) == 40_000
    assert ratings["userId"].nunique() == 1000 and ratings["movieId"].nunique() == 2000
    assert not ratings.duplicated(["userId", "movieId"]).any()
    assert ratings.groupby("userId").size().min() >= MIN_RATINGS_PER_USER
    assert set(ratings["rating"]) <= {k / 2 for k in range(1, 11)}
    assert ratings["timestamp"].between(789_652_009, 1_574_327_703).all()
    assert ratings["userId"].is_monotonic_increasing  # ordered by user, as GroupLens ships it
    assert all(
        line.split(",")[2] in {f"{k / 2:.1f}" for k in range(1, 11)}
        for line in (synth / "ratings.csv").read_text().splitlines()[1:50]
    )  # "4.0", not "4"


def test_skew_is_power_law_like(synth):
    ratings = pd.read_csv(synth / "ratings.csv")
    per_item = np.sort(ratings.groupby("movieId").size().to_numpy())[::-1]
    per_user = np.sort(ratings.groupby("userId").size().to_numpy())[::-1]
    assert per_item[:200].sum() > 0.4 * len(ratings)  # the top 10% of items get over 40% of ratings
    assert per_user[:100].sum() > 0.3 * len(ratings)  # the top 10% of users give over 30%
    assert per_user[0] > 10 * np.median(per_user)


def test_movies_parse_with_the_ml25m_reader(synth):
    with open(synth / "movies.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["movieId", "title", "genres"] and len(rows) == 2001
    assert any("," in title for _, title, _ in rows[1:])  # quoted titles, as in ML-25M
    items = ML25M(synth).read_items(np.array([]))
    assert len(items) == 2000 and items["year"].notna().all()
    assert (items["genres"].map(len) == 0).any()  # "(no genres listed)"

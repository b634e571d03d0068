"""Write a synthetic rating log in the MovieLens-25M file format (ratings.csv + movies.csv).

    reclora synth --users 162541 --items 59047 --rows 25000095 --out /tmp/ml-25m-synth

The skew is MovieLens-like: item popularity follows a Zipf law, user activity a Pareto law
with at least 20 ratings per user (as in ML-25M), each user rates within one activity window
(from a day to years) over 1995-2019, and ratings are half stars with ML-25M's histogram.
Every user and every item appears, and no (user, item) pair repeats, so `prepare` with
k_core 0 keeps exactly `rows` behaviours, `users` users and `items` items.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

log = logging.getLogger(__name__)

MIN_RATINGS_PER_USER = 20
FIRST_TIMESTAMP, LAST_TIMESTAMP = 789_652_009, 1_574_327_703  # ML-25M's first and last rating
HALF_STARS = tuple(f"{k / 2:.1f}" for k in range(1, 11))  # written as ML-25M does: "0.5" .. "5.0"
HALF_STAR_SHARE = np.array([0.016, 0.031, 0.016, 0.063, 0.050, 0.195, 0.131, 0.266, 0.088, 0.144])
GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "IMAX",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
MAX_MOVIE_ID = 209_171  # ML-25M's ids are sparse up to this


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=162_541)
    parser.add_argument("--items", type=int, default=59_047)
    parser.add_argument("--rows", type=int, default=25_000_095)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder to write ratings.csv and movies.csv into")


def main(args: argparse.Namespace) -> int:
    write_synthetic_ml25m(Path(args.out), args.users, args.items, args.rows, args.seed)
    return 0


def user_activity(rng: np.random.Generator, n_users: int, n_rows: int, cap: int) -> np.ndarray:
    """Ratings per user: >= MIN_RATINGS_PER_USER, Pareto-skewed, <= cap, summing to n_rows."""
    counts = np.full(n_users, MIN_RATINGS_PER_USER, dtype=np.int64)
    weights = rng.pareto(1.2, n_users) + 1e-3
    extra = n_rows - counts.sum()
    counts += np.floor(extra * weights / weights.sum()).astype(np.int64)
    np.minimum(counts, cap, out=counts)
    while (missing := n_rows - counts.sum()) > 0:
        room = np.flatnonzero(counts < cap)
        np.add.at(counts, rng.choice(room, size=min(missing, len(room)), replace=False), 1)
    return counts


def draw_items(rng: np.random.Generator, user: np.ndarray, n_items: int) -> np.ndarray:
    """Zipf-popular items per row; each item is forced into one random row so all appear, then
    repeated (user, item) pairs are redrawn uniformly until none is left."""
    n = len(user)
    popularity = 1.0 / (np.arange(n_items) + 10.0) ** 1.1
    cdf = np.cumsum(rng.permutation(popularity))
    cdf /= cdf[-1]
    item = np.searchsorted(cdf, rng.random(n)).astype(np.int64)
    coverage_rows = rng.choice(n, size=n_items, replace=False)
    item[coverage_rows] = rng.permutation(n_items)
    redraw_first = np.ones(n, dtype=bool)
    redraw_first[coverage_rows] = False  # a repeated pair keeps its coverage row
    while True:
        key = user * n_items + item
        order = np.lexsort((redraw_first, key))
        repeated = order[1:][key[order[1:]] == key[order[:-1]]]
        if len(repeated) == 0:
            return item
        item[repeated] = rng.integers(0, n_items, size=len(repeated))


def write_synthetic_ml25m(out: Path, n_users: int, n_items: int, n_rows: int, seed: int = 0) -> Path:
    if n_items > MAX_MOVIE_ID:
        raise ValueError(f"--items must be <= {MAX_MOVIE_ID} (ML-25M's id range)")
    if n_rows < n_users * MIN_RATINGS_PER_USER or n_rows < n_items:
        raise ValueError(f"--rows must be >= {MIN_RATINGS_PER_USER} x users and >= items")
    if n_rows > n_users * (n_items // 2):
        raise ValueError("--rows is too large for that many users and items (at most users x items/2)")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)

    counts = user_activity(rng, n_users, n_rows, cap=n_items // 2)
    user = np.repeat(np.arange(n_users, dtype=np.int64), counts)
    item = draw_items(rng, user, n_items)
    log.info("drew %d (user, item) pairs in %.1f s", n_rows, time.perf_counter() - started)

    # One activity window per user: later start dates are more common (the site grew), and
    # the window lasts from hours to years (log-normal).
    span = LAST_TIMESTAMP - FIRST_TIMESTAMP
    start = FIRST_TIMESTAMP + (span * rng.beta(2.0, 1.2, n_users)).astype(np.int64)
    length = np.minimum(np.exp(rng.normal(15.0, 2.5, n_users)), LAST_TIMESTAMP - start).astype(np.int64)
    timestamp = start[user] + (length[user] * rng.random(n_rows) ** 2).astype(np.int64)
    stars = rng.choice(len(HALF_STARS), size=n_rows, p=HALF_STAR_SHARE / HALF_STAR_SHARE.sum())

    movie_ids = np.sort(rng.choice(np.arange(1, MAX_MOVIE_ID + 1), size=n_items, replace=False))
    order = np.lexsort((timestamp, user))  # ML-25M's file is ordered by user
    star_text = pa.array(HALF_STARS)
    with open(out / "ratings.csv", "wb") as f:
        f.write(b"userId,movieId,rating,timestamp\n")
        for lo in range(0, n_rows, 2_000_000):
            rows = order[lo : lo + 2_000_000]
            pcsv.write_csv(
                pa.table(
                    {
                        "userId": user[rows] + 1,
                        "movieId": movie_ids[item[rows]],
                        "rating": star_text.take(stars[rows]),
                        "timestamp": timestamp[rows],
                    }
                ),
                f,
                write_options=pcsv.WriteOptions(include_header=False, quoting_style="none"),
            )
    write_movies(out / "movies.csv", rng, movie_ids)
    log.info(
        "wrote %d ratings of %d users on %d movies to %s in %.1f s",
        n_rows,
        n_users,
        n_items,
        out,
        time.perf_counter() - started,
    )
    return out


def write_movies(path: Path, rng: np.random.Generator, movie_ids: np.ndarray) -> None:
    """movies.csv with MovieLens quirks: quoted titles with commas, '|' genres, no-genre movies."""
    years = rng.integers(1920, 2020, size=len(movie_ids))
    titles = [
        f"Synthetic Movie {m}, The ({y})" if m % 7 == 0 else f"Synthetic Movie {m} ({y})"
        for m, y in zip(movie_ids.tolist(), years.tolist())
    ]
    genres = []
    for k in rng.integers(0, 4, size=len(movie_ids)).tolist():
        picked = rng.choice(len(GENRES), size=k, replace=False)
        genres.append("|".join(GENRES[g] for g in sorted(picked)) if k else "(no genres listed)")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["movieId", "title", "genres"])
        writer.writerows(zip(movie_ids.tolist(), titles, genres))

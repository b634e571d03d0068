"""A small prepared dataset that follows the contract in reclora_ray/data/prepared.py, and
random item embeddings for it, so the retrieval stages run without the prepare stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

GENRES = ["Action", "Comedy", "Drama", "Sci-Fi", "Romance", "Horror"]


def write_prepared(root: Path, n_users: int = 25, n_items: int = 90, max_len: int = 80, seed: int = 0) -> Path:
    """OUT/data for a random ML-100K-like log: every behaviour is a sample, split 8:1:1 by time."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "samples").mkdir(parents=True, exist_ok=True)
    years = rng.integers(1950, 2000, n_items)
    genres = [list(rng.choice(GENRES, rng.integers(1, 3), replace=False)) for _ in range(n_items)]
    titles = [f"Movie {i} ({y})" for i, y in enumerate(years)]
    pd.DataFrame(
        {
            "item_id": np.arange(n_items),
            "raw_id": np.arange(1, n_items + 1),
            "title": titles,
            "year": years,
            "genres": genres,
            "text": [
                f"Here is a movie. Its title is {t}. The movie's genre is {', '.join(g)}."
                for t, g in zip(titles, genres)
            ],
        }
    ).to_parquet(root / "items.parquet")
    genders = rng.choice(["M", "F"], n_users)
    pd.DataFrame(
        {
            "user_id": np.arange(n_users),
            "raw_id": np.arange(1, n_users + 1),
            "gender": genders,
            "age": ["25"] * n_users,
            "occupation": ["writer"] * n_users,
            "zip": ["12345"] * n_users,
            "profile_text": [
                f"The user is a {'male' if g == 'M' else 'female'}. {'His' if g == 'M' else 'Her'} job is writer. "
                f"{'His' if g == 'M' else 'Her'} age is 25."
                for g in genders
            ],
        }
    ).to_parquet(root / "users.parquet")
    lengths = rng.integers(5, max_len, n_users)
    rows = []
    for u, length in enumerate(lengths):
        items = rng.choice(n_items, length, replace=False).astype(np.int32)
        ratings = rng.integers(1, 6, length).astype(np.float32)
        times = np.sort(rng.integers(0, 10**6, length)) + u  # distinct across users
        rows.append((u, items, ratings, (ratings >= 4).astype(np.int8), times.astype(np.int64)))
    seq = pd.DataFrame(rows, columns=["user_id", "item_ids", "ratings", "labels", "timestamps"])
    pq.write_table(pa.Table.from_pandas(seq, preserve_index=False), root / "sequences.parquet")
    samples = pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(n_users), lengths),
            "item_id": np.concatenate(seq["item_ids"].to_list()),
            "label": np.concatenate(seq["labels"].to_list()),
            "rating": np.concatenate(seq["ratings"].to_list()),
            "timestamp": np.concatenate(seq["timestamps"].to_list()),
            "pos": np.concatenate([np.arange(n) for n in lengths]),
        }
    ).sort_values(["timestamp", "user_id"], kind="stable", ignore_index=True)
    samples.insert(0, "sample_id", np.arange(len(samples), dtype=np.int64))
    cuts = [0, int(0.8 * len(samples)), int(0.9 * len(samples)), len(samples)]
    for split, a, b in zip(("train", "valid", "test"), cuts[:-1], cuts[1:]):
        samples.iloc[a:b].to_parquet(root / "samples" / f"{split}.parquet", index=False)
    (root / "meta.json").write_text(json.dumps({"dataset": "ml-100k", "n_users": n_users, "n_items": n_items}))
    return root


def _write_embeddings(directory: Path, vectors: np.ndarray, item_ids: np.ndarray | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = np.arange(len(vectors)) if item_ids is None else item_ids
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array(ids, pa.int64()),
                "embedding": pa.array(list(vectors.astype(np.float32)), pa.list_(pa.float32())),
            }
        ),
        directory / "item_embeddings.parquet",
    )
    return directory


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """OUT with a prepared dataset in OUT/data."""
    write_prepared(tmp_path / "data")
    return tmp_path


@pytest.fixture()
def write_embeddings():
    """write_embeddings(directory, vectors, item_ids=None): an item_embeddings.parquet."""
    return _write_embeddings

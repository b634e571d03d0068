"""A small contract-conforming prepared dataset (reclora_ray/data/prepared.py) with a learnable
signal: ratings follow user x item latent factors, so a user's history predicts the label."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reclora_ray.config import load_config

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def write_prepared(
    root: Path,
    n_users: int = 200,
    n_items: int = 150,
    k_long: int = 20,
    with_retrieval: bool = True,
    dataset: str = "ml-100k",
    seed: int = 0,
    row_group_size: int = 700,
) -> Path:
    """Write OUT/data (and OUT/retrieval when asked) under `root`; returns the data dir."""
    rng = np.random.default_rng(seed)
    data = Path(root) / "data"
    (data / "samples").mkdir(parents=True)
    user_factors = rng.normal(size=(n_users, 4))
    item_factors = rng.normal(size=(n_items, 4))
    item_bias = rng.normal(scale=0.5, size=n_items)

    rows = []
    for user in range(n_users):
        items = rng.choice(n_items, size=int(rng.integers(12, 45)), replace=False)
        times = np.sort(rng.integers(880_000_000, 890_000_000, size=len(items)))
        score = user_factors[user] @ item_factors[items].T / 2 + item_bias[items]
        ratings = np.clip(np.rint(3.4 + score + rng.normal(scale=0.5, size=len(items))), 1, 5)
        rows += [(user, int(i), float(r), int(t)) for i, r, t in zip(items, ratings, times)]
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    log["label"] = (log["rating"] >= 4).astype(np.int8)
    log["pos"] = log.groupby("user_id").cumcount().astype(np.int64)
    log = log.sort_values(["timestamp", "user_id", "pos"], kind="stable", ignore_index=True)
    log.insert(0, "sample_id", np.arange(len(log), dtype=np.int64))

    sequences = (
        log.sort_values(["user_id", "pos"])
        .groupby("user_id")
        .agg(
            item_ids=("item_id", list), ratings=("rating", list), labels=("label", list), timestamps=("timestamp", list)
        )
        .reset_index()
    )
    pq.write_table(pa.Table.from_pandas(sequences, preserve_index=False), data / "sequences.parquet")

    genre_of = np.argmax(item_factors @ rng.normal(size=(4, len(GENRES))), axis=1)
    items = pd.DataFrame(
        {
            "item_id": np.arange(n_items),
            "raw_id": [f"m{i}" for i in range(n_items)],
            "title": [f"Movie {i}" for i in range(n_items)],
            "year": pd.array([None if i % 17 == 0 else 1980 + i % 20 for i in range(n_items)], dtype="Int64"),
            "genres": [[GENRES[g]] + ([GENRES[(g + 1) % 6]] if i % 3 == 0 else []) for i, g in enumerate(genre_of)],
            "text": [f"Movie {i}" for i in range(n_items)],
        }
    )
    items.to_parquet(data / "items.parquet", index=False)
    users = pd.DataFrame(
        {
            "user_id": np.arange(n_users),
            "raw_id": [f"u{u}" for u in range(n_users)],
            "gender": pd.array([["M", "F"][u % 2] for u in range(n_users)], dtype="string"),
            "age": pd.array([str(18 + 7 * (u % 6)) for u in range(n_users)], dtype="string"),
            "occupation": pd.array([None if u % 11 == 0 else f"job{u % 7}" for u in range(n_users)], dtype="string"),
            "zip": pd.array([f"{10000 + u % 40}" for u in range(n_users)], dtype="string"),
            "profile_text": [f"user {u}" for u in range(n_users)],
        }
    )
    users.to_parquet(data / "users.parquet", index=False)

    n = len(log)
    bounds = [0, int(0.8 * n), int(0.9 * n), n]
    counts = {}
    for split, a, b in zip(("train", "valid", "test"), bounds, bounds[1:]):
        part = log.iloc[a:b][["sample_id", "user_id", "item_id", "label", "rating", "timestamp", "pos"]]
        pq.write_table(
            pa.Table.from_pandas(part, preserve_index=False),
            data / "samples" / f"{split}.parquet",
            row_group_size=row_group_size,
        )
        counts[split] = {"rows": b - a}
        if with_retrieval:
            write_retrieval(data, split, part, sequences, item_factors, k_long, row_group_size)
    meta = {"dataset": dataset, "counts": counts, "label_rule": "rating >= 4", "k_core": 0}
    (data / "meta.json").write_text(json.dumps(meta))
    return data


def write_retrieval(
    data: Path,
    split: str,
    samples: pd.DataFrame,
    sequences: pd.DataFrame,
    item_factors: np.ndarray,
    k: int,
    row_group_size: int,
) -> None:
    """hist_long: the k earlier behaviours most similar to the target, chronological."""
    unit = item_factors / np.linalg.norm(item_factors, axis=1, keepdims=True)
    hist_long, hist_short = [], []
    for user, item, pos in samples[["user_id", "item_id", "pos"]].itertuples(index=False):
        earlier = np.asarray(sequences.item_ids[user][:pos], dtype=np.int64)
        best = np.sort(np.argsort(-(unit[earlier] @ unit[item]), kind="stable")[:k])
        hist_long.append(best.astype(np.int32))
        hist_short.append(best[-5:].astype(np.int32))
    table = pa.table(
        {
            "sample_id": pa.array(samples["sample_id"].to_numpy()),
            "hist_long": pa.array(hist_long, type=pa.list_(pa.int32())),
            "hist_short": pa.array(hist_short, type=pa.list_(pa.int32())),
        }
    )
    (data.parent / "retrieval").mkdir(exist_ok=True)
    pq.write_table(table, data.parent / "retrieval" / f"{split}.parquet", row_group_size=row_group_size)


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory) -> Path:
    """A run directory holding OUT/data and OUT/retrieval; shared, read-only for tests."""
    root = tmp_path_factory.mktemp("crm-run")
    write_prepared(root)
    return root


def with_crm(cfg, **changes):
    """cfg with its (frozen) crm section changed."""
    return dataclasses.replace(cfg, crm=dataclasses.replace(cfg.crm, **changes))


@pytest.fixture
def crm_cfg():
    """The tiny config, sized for seconds-long training on the fixture data."""
    return load_config(
        "tiny",
        ["crm.num_workers=2", "crm.cpus_per_worker=0.5", "run.num_cpus=2", "crm.batch_size=256", "crm.chunk_rows=2000"],
    )


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A fresh run directory of the fixture data that a test may modify."""
    write_prepared(tmp_path / "run")
    return tmp_path / "run"

"""The prepared-dataset contract (docs/architecture.md) and its in-memory form.

On disk (one directory, usually OUT/data):
  meta.json                     dataset, label rule, k-core, split, counts, field vocabularies
  items.parquet                 item_id, raw_id, title, year, genres (list), text, [dataset fields]
  users.parquet                 user_id, raw_id, profile fields (strings, may be null), profile_text
  sequences.parquet             user_id, item_ids, ratings, labels, timestamps (lists, chronological);
                                a folder of parquet shards (any pyarrow/pandas reader takes it)
  samples/{train,valid,test}.parquet
                                sample_id, user_id, item_id, label, rating, timestamp, pos
  next_item/{train,valid,test}.parquet
                                the next-item task: sample_id, user_id, item_id (target), timestamp,
                                pos, candidates, target_index (reclora_ray/data/next_item.py)
A sample's history is sequences[user][:pos]; it is never copied per sample. In memory the
sequences are held in CSR form (offsets + flat arrays), so ML-25M fits on one machine.

sample_id numbers every sample in global time order (timestamp, then user raw id, then item raw
id); the splits are consecutive ranges of it. When data.test_subsample is set, test.parquet holds
only that fixed random subsample (meta.json: test_subsample, splits.test.rows_before_subsample);
the sequences always keep every behaviour. With data.min_history = N a user's first N behaviours
are in the sequence but are not samples. Ids: int64; label int8; rating float32; pos int32.
raw_id is the catalogue's own id (int64, or string for string-keyed logs): every interface a
person meets speaks it (data/catalogue.py). A generic (`interactions`) dataset may also list
cold-start items (data.cold_items: after the others, in no sequence) and carries its text
templates and whether it has ratings in meta.json ("text", "rated").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from reclora_ray.rundir import RunDir

SPLITS = ("train", "valid", "test")
SAMPLE_COLUMNS = ("sample_id", "user_id", "item_id", "label", "rating", "timestamp", "pos")
SEQUENCE_COLUMNS = ("user_id", "item_ids", "ratings", "labels", "timestamps")


class PreparedDataError(ValueError):
    """A prepared directory that is missing, incomplete or inconsistent; names the file."""


def recent_indices(pos: np.ndarray, k: int) -> np.ndarray:
    """The last min(pos, k) indices before each pos, ascending, -1 padded on the left: (n, k) int32."""
    idx = np.asarray(pos, dtype=np.int64)[:, None] + np.arange(-k, 0, dtype=np.int64)[None, :]
    return np.where(idx >= 0, idx, -1).astype(np.int32)


@dataclass
class Sequences:
    """Every user's chronological behaviours, CSR: user u owns [offsets[u], offsets[u+1])."""

    offsets: np.ndarray  # int64, n_users + 1
    item_ids: np.ndarray  # int32
    ratings: np.ndarray  # float32
    labels: np.ndarray  # int8
    timestamps: np.ndarray  # int64

    def length(self, user_ids: np.ndarray) -> np.ndarray:
        return self.offsets[user_ids + 1] - self.offsets[user_ids]

    def recent(self, user_ids: np.ndarray, pos: np.ndarray, k: int) -> np.ndarray:
        """Indices (into each user's sequence) of the last k behaviours before pos, -1 padded
        on the left, chronological: shape (n, k)."""
        return recent_indices(pos, k)

    def gather(self, user_ids: np.ndarray, indices: np.ndarray, field: str = "item_ids") -> np.ndarray:
        """Values of `field` at per-user sequence indices (n, k); -1 indices give -1 / 0."""
        flat = getattr(self, field)
        base = self.offsets[np.asarray(user_ids, dtype=np.int64)][:, None]
        valid = indices >= 0
        values = flat[np.where(valid, base + indices, 0)]
        fill = -1 if field == "item_ids" else 0
        return np.where(valid, values, fill)


class PreparedData:
    """A loaded prepared dataset: meta, items, users, CSR sequences, sample splits on demand."""

    def __init__(self, root: Path, meta: dict, items: pd.DataFrame, users: pd.DataFrame, sequences: Sequences):
        self.root = Path(root)
        self.meta = meta
        self.items = items
        self.users = users
        self.sequences = sequences

    @property
    def run(self) -> RunDir:
        """The run directory this dataset is the `data` output of (OUT/data -> OUT)."""
        return RunDir(self.root.parent)

    @property
    def dataset(self) -> str:
        return self.meta["dataset"]

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def split_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise PreparedDataError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.root / "samples" / f"{split}.parquet"

    def samples(self, split: str, columns: list[str] | None = None) -> pd.DataFrame:
        return pd.read_parquet(self.split_path(split), columns=columns)

    def next_item(self, split: str) -> tuple[pd.DataFrame, np.ndarray]:
        """The split's next-item rows (less the candidates) and their candidates, (n, C) int64."""
        from reclora_ray.data.next_item import NEXT_ITEM_DIR

        path = self.root / NEXT_ITEM_DIR / f"{self.split_path(split).name}"
        if not path.is_file():
            raise PreparedDataError(f"{path} is missing: prepare this dataset again (it predates the next-item task)")
        table = pq.read_table(path)
        width = table.schema.field("candidates").type.list_size
        candidates = table.column("candidates").combine_chunks().flatten().to_numpy().reshape(-1, width)
        return table.drop(["candidates"]).to_pandas(), candidates

    @classmethod
    def load(cls, root: str | Path, expect_dataset: str | None = None) -> "PreparedData":
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise PreparedDataError(
                f"{root} holds no prepared dataset (no meta.json); run `reclora prepare --out {root.parent}` first"
            )
        meta = json.loads(meta_path.read_text())
        if expect_dataset is not None and meta.get("dataset") != expect_dataset:
            raise PreparedDataError(
                f"{meta_path}: prepared for dataset {meta.get('dataset')!r}, but the config asks for {expect_dataset!r}"
            )
        for name in ("items.parquet", "users.parquet", "sequences.parquet", *(f"samples/{s}.parquet" for s in SPLITS)):
            if not (root / name).exists():
                raise PreparedDataError(f"{root / name} is missing: the prepared dataset is incomplete")
        items = pd.read_parquet(root / "items.parquet")
        users = pd.read_parquet(root / "users.parquet")
        _check_dense(items["item_id"].to_numpy(), root / "items.parquet", "item_id")
        _check_dense(users["user_id"].to_numpy(), root / "users.parquet", "user_id")
        sequences = _load_sequences(root / "sequences.parquet", n_users=len(users))
        return cls(
            root,
            meta,
            items.sort_values("item_id", ignore_index=True),
            users.sort_values("user_id", ignore_index=True),
            sequences,
        )


def _check_dense(ids: np.ndarray, path: Path, column: str) -> None:
    if not np.array_equal(np.sort(ids), np.arange(len(ids))):
        raise PreparedDataError(f"{path}: column {column} is not the dense range 0..{len(ids) - 1}")


def _load_sequences(path: Path, n_users: int) -> Sequences:
    table = pq.read_table(path, columns=list(SEQUENCE_COLUMNS))
    user_ids = table.column("user_id").to_numpy()
    order = np.argsort(user_ids, kind="stable")
    if not np.array_equal(user_ids[order], np.arange(n_users)):
        raise PreparedDataError(f"{path}: expected exactly one row per user 0..{n_users - 1}")

    def flat(column: str, dtype) -> tuple[np.ndarray, np.ndarray]:
        chunked = table.column(column).combine_chunks().take(order)
        lengths = chunked.value_lengths().to_numpy(zero_copy_only=False)
        return chunked.flatten().to_numpy().astype(dtype, copy=False), lengths

    item_ids, lengths = flat("item_ids", np.int32)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ratings, _ = flat("ratings", np.float32)
    labels, _ = flat("labels", np.int8)
    timestamps, _ = flat("timestamps", np.int64)
    return Sequences(offsets, item_ids, ratings, labels, timestamps)

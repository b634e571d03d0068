"""The next-item ranking task (iLoRA, LLaRA): per target behaviour, a fixed set of candidates.

A target is a behaviour of a global-time split (the same split as the CTR samples); its history
is the up to `data.next_item.history` behaviours before it in the user's sequence, whatever split
they fell in (`Sequences.recent(user, pos, k)`). Its candidates are the target and
`candidates - 1` distinct items the user never interacted with (in any split), drawn uniformly
with a seed per split and shuffled, so every model is scored on identical candidates.

On disk, beside the CTR samples: OUT/data/next_item/{train,valid,test}.parquet with
    sample_id, user_id, item_id (the target), timestamp, pos, candidates (list), target_index
where candidates[target_index] == item_id.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reclora_ray.config import NextItemDataConfig

log = logging.getLogger(__name__)

NEXT_ITEM_DIR = "next_item"
NEXT_ITEM_COLUMNS = ("sample_id", "user_id", "item_id", "timestamp", "pos", "candidates", "target_index")


class CandidateSamplingError(ValueError):
    """A user has interacted with too much of the catalogue to draw the negatives."""


def interaction_keys(user: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
    """Sorted unique user * n_items + item over every behaviour: the membership test for negatives."""
    return np.unique(user.astype(np.int64) * n_items + item.astype(np.int64))


def candidate_sets(
    users: np.ndarray,
    targets: np.ndarray,
    keys: np.ndarray,
    n_items: int,
    n_candidates: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(candidates (n, n_candidates) int64, target_index (n,) int8): the target once, the rest
    distinct items outside the user's interactions (`keys`), in a random order."""
    users = np.asarray(users, dtype=np.int64)
    n, n_neg = len(users), n_candidates - 1
    interacted = np.searchsorted(keys, (users + 1) * n_items) - np.searchsorted(keys, users * n_items)
    short = np.flatnonzero(n_items - interacted < n_neg)
    if len(short):
        u = int(users[short[0]])
        raise CandidateSamplingError(
            f"user {u} interacted with {int(interacted[short[0]])} of {n_items} items: fewer than the "
            f"{n_neg} never-seen items its {n_candidates} candidates need; lower data.next_item.candidates"
        )
    neg = rng.integers(0, n_items, size=(n, n_neg), dtype=np.int64)
    while True:
        bad = _is_interacted(users[:, None], neg, keys, n_items) | _repeats(neg)
        if not bad.any():
            break
        neg[bad] = rng.integers(0, n_items, size=int(bad.sum()), dtype=np.int64)
    candidates = np.concatenate([np.asarray(targets, dtype=np.int64)[:, None], neg], axis=1)
    order = rng.permuted(np.tile(np.arange(n_candidates), (n, 1)), axis=1)
    candidates = np.take_along_axis(candidates, order, axis=1)
    target_index = np.argmax(order == 0, axis=1).astype(np.int8)
    return candidates, target_index


def _is_interacted(users: np.ndarray, items: np.ndarray, keys: np.ndarray, n_items: int) -> np.ndarray:
    query = users * n_items + items
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return keys[at] == query


def _repeats(values: np.ndarray) -> np.ndarray:
    """True at every later occurrence of a value already earlier in its row."""
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    dup_sorted = np.zeros_like(ordered, dtype=bool)
    dup_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return dup


def next_item_table(
    *,
    sample_id: np.ndarray,
    user: np.ndarray,
    item: np.ndarray,
    timestamp: np.ndarray,
    pos: np.ndarray,
    keys: np.ndarray,
    n_items: int,
    cfg: NextItemDataConfig,
    rng: np.random.Generator,
) -> pa.Table:
    """One split's next-item rows from its behaviours (global order), subsampled per `cfg`."""
    rows = np.flatnonzero(pos >= max(cfg.min_history, 1))
    # A user who interacted with nearly the whole catalogue has no candidates - 1 items left to
    # draw: their targets are left out of the task (a small catalogue), counted in the log.
    users = user[rows].astype(np.int64)
    interacted = np.searchsorted(keys, (users + 1) * n_items) - np.searchsorted(keys, users * n_items)
    drawable = n_items - interacted >= cfg.candidates - 1
    if not drawable.all():
        log.warning(
            "next-item task: %d of %d targets left out, their users have fewer than %d never-seen items",
            int((~drawable).sum()),
            len(rows),
            cfg.candidates - 1,
        )
        rows = rows[drawable]
    if cfg.max_per_split is not None and len(rows) > cfg.max_per_split:
        rows = np.sort(rng.choice(rows, size=cfg.max_per_split, replace=False))
    candidates, target_index = candidate_sets(user[rows], item[rows], keys, n_items, cfg.candidates, rng)
    return pa.table(
        {
            "sample_id": np.asarray(sample_id[rows], dtype=np.int64),
            "user_id": user[rows].astype(np.int64),
            "item_id": item[rows].astype(np.int64),
            "timestamp": timestamp[rows],
            "pos": pos[rows].astype(np.int32),
            "candidates": pa.FixedSizeListArray.from_arrays(candidates.ravel(), cfg.candidates),
            "target_index": target_index,
        }
    )


def write_next_item(directory: Path, tables: dict[str, pa.Table]) -> None:
    directory.mkdir()
    for name, table in tables.items():
        pq.write_table(table, directory / f"{name}.parquet")

"""The short (text) and long (ID) histories of a batch of samples, as padded arrays.

Tuning, batch scoring and serving all go through `HistoryBatch`, so a sample gets the same
prompt and the same R_c whichever path scores it. Histories are item ids and star ratings,
chronological, left-padded with item -1 / rating 0 to a fixed K.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reclora_ray.data.prepared import Sequences


@dataclass
class HistoryBatch:
    item_ids: np.ndarray  # (B, K) int64, -1 = padding
    ratings: np.ndarray  # (B, K) float32, 0 at padding

    def row(self, i: int) -> tuple[list[int], list[float]]:
        """Sample i's history without padding, oldest first."""
        keep = self.item_ids[i] >= 0
        return self.item_ids[i][keep].tolist(), self.ratings[i][keep].tolist()


def pad_index_lists(lists, k: int) -> np.ndarray:
    """Ragged per-sample sequence indices (each at most k, chronological) -> (B, k), -1 on the left."""
    out = np.full((len(lists), k), -1, dtype=np.int64)
    for i, idx in enumerate(lists):
        idx = np.asarray(idx, dtype=np.int64)[-k:]
        if len(idx):
            out[i, k - len(idx):] = idx
    return out


def history_batch(
    sequences: Sequences,
    user_ids: np.ndarray,
    pos: np.ndarray,
    k: int,
    mode: str,
    retrieved=None,
) -> HistoryBatch:
    """Histories of k behaviours: the retrieved index lists (`semantic`) or the last k (`recent`)."""
    user_ids = np.asarray(user_ids, dtype=np.int64)
    if mode == "recent":
        indices = sequences.recent(user_ids, np.asarray(pos), k).astype(np.int64)
    elif mode == "semantic":
        if retrieved is None:
            raise ValueError("semantic histories need the retrieval output; run `reclora retrieve` first")
        indices = pad_index_lists(retrieved, k)
    else:
        raise ValueError(f"unknown history mode {mode!r}; expected 'semantic' or 'recent'")
    return HistoryBatch(
        item_ids=sequences.gather(user_ids, indices, "item_ids").astype(np.int64),
        ratings=sequences.gather(user_ids, indices, "ratings").astype(np.float32),
    )


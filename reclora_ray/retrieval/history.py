"""The Long-Short Modality Retriever's core: which earlier behaviours each sample keeps.

For a sample (user u, target item t, pos p) the candidates are u's behaviours 0..p-1. `semantic`
keeps the K with the highest cosine similarity between their item and t (item embeddings are
unit vectors, so cosine = dot product); `recent` keeps the last K. Either way the kept indices
are returned in chronological (ascending) order; a sample with p <= K keeps all p. Ties in
similarity (a user who met the same item twice) go to the more recent behaviour, so results
are exact and reproducible.

The batch computation never copies histories per sample and has no per-sample Python loop:
samples are grouped per user, and for each group one matrix product
`E[targets] @ E[sequence[:max_pos]].T` scores all of them at once, the strict future is masked
to -inf, and a partition finds each row's k-th score. Targets are scored in chunks of at most
MAX_CHUNK_TARGETS rows and `max_block` entries, which bounds memory whatever the history length
and keeps the wasted (masked) part of each matrix small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from reclora_ray.data.prepared import recent_indices

MODES = ("semantic", "recent")
MAX_CHUNK_TARGETS = 256  # targets scored together: bounds the work wasted on the masked future


@dataclass
class HistoryRetriever:
    """Everything needed to retrieve for any sample: CSR sequences and the item embeddings."""

    offsets: np.ndarray  # int64 (n_users + 1,): user u owns seq_items[offsets[u]:offsets[u+1]]
    seq_items: np.ndarray  # int32, every user's items in chronological order
    embeddings: np.ndarray | None  # float32 (n_items, d), unit rows; None when no mode is semantic
    k_long: int
    k_short: int
    long_mode: str = "semantic"
    short_mode: str = "semantic"
    max_block: int = 1 << 22  # score-matrix entries per chunk (16 MiB of float32)

    def __post_init__(self):
        for name in ("long_mode", "short_mode"):
            if getattr(self, name) not in MODES:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {MODES}")
        if self.embeddings is None and "semantic" in (self.long_mode, self.short_mode):
            raise ValueError("semantic retrieval needs item embeddings")

    def retrieve(self, user_ids: np.ndarray, item_ids: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hist_long (n, k_long), hist_short (n, k_short)): int32 indices into each user's
        sequence, ascending, -1 padded on the left (as `Sequences.recent`); row i holds
        min(pos[i], K) indices."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.asarray(pos, dtype=np.int64)
        lengths = self.offsets[user_ids + 1] - self.offsets[user_ids]
        if np.any(pos < 0) or np.any(pos > lengths):
            bad = int(np.flatnonzero((pos < 0) | (pos > lengths))[0])
            raise ValueError(f"sample {bad}: pos {pos[bad]} outside user {user_ids[bad]}'s sequence of {lengths[bad]}")
        # Recent is also the answer for every sample with pos <= K, in either mode.
        hist_long = recent_indices(pos, self.k_long)
        hist_short = recent_indices(pos, self.k_short)
        semantic = {
            name: k
            for name, k, mode in (("long", self.k_long, self.long_mode), ("short", self.k_short, self.short_mode))
            if mode == "semantic"
        }
        if semantic:
            outputs = {"long": hist_long, "short": hist_short}
            self._semantic(user_ids, item_ids, pos, semantic, outputs)
        return hist_long, hist_short

    # ------------------------------------------------------------------ semantic

    def _semantic(self, user_ids, item_ids, pos, ks: dict[str, int], outputs: dict[str, np.ndarray]) -> None:
        rows = np.flatnonzero(pos > min(ks.values()))
        if len(rows) == 0:
            return
        rows = rows[np.lexsort((pos[rows], user_ids[rows]))]  # grouped per user, pos ascending
        users = user_ids[rows]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        ends = np.r_[starts[1:], len(rows)]
        for start, end in zip(starts, ends):
            group = rows[start:end]
            base = self.offsets[users[start]]
            history = self.seq_items[base : base + pos[group[-1]]]
            # A user who met an item twice must see two bitwise-equal scores (ties are broken by
            # recency), which a matrix product over repeated columns does not promise.
            unique, inverse = np.unique(history, return_inverse=True)
            if len(unique) == len(history):
                vectors, inverse = self.embeddings[history], None
            else:
                vectors = self.embeddings[unique]
            chunk = int(np.clip(self.max_block // len(history), 1, MAX_CHUNK_TARGETS))
            for c in range(0, len(group), chunk):
                part = group[c : c + chunk]
                self._score_chunk(vectors, inverse, item_ids[part], pos[part], part, ks, outputs)

    def _score_chunk(self, vectors, inverse, targets, pos, rows, ks, outputs) -> None:
        width = int(pos[-1])
        if inverse is None:
            scores = self.embeddings[targets] @ vectors[:width].T  # (chunk, width)
        else:
            scores = (self.embeddings[targets] @ vectors.T)[:, inverse[:width]]
        first = int(pos[0])  # every column before the chunk's smallest pos is past for all rows
        np.copyto(scores[:, first:], -np.inf, where=np.arange(first, width)[None, :] >= pos[:, None])
        # The widest K is taken from all candidates, the other from its selection: the top k of
        # a total order lie within its top K for k <= K.
        (big_name, big_k), *rest = sorted(ks.items(), key=lambda kv: -kv[1])
        big = outputs[big_name]
        wide = pos > big_k
        if wide.any():
            big[rows[wide]] = top_k_columns(scores[wide], big_k)
        for name, k in rest:
            chosen = big[rows]
            picked = np.take_along_axis(scores, np.maximum(chosen, 0), axis=1)
            picked[chosen < 0] = -np.inf
            narrow = pos > k
            slots = top_k_columns(picked[narrow], k)
            outputs[name][rows[narrow]] = np.take_along_axis(chosen[narrow], slots, axis=1)


def top_k_columns(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of its k largest scores in ascending order: (n, k) int32.

    Exact: ties at the boundary go to the larger column (the more recent behaviour). Every row
    needs at least k finite scores; masked entries are -inf and never chosen.
    """
    n, width = scores.shape
    kth = np.partition(scores, width - k, axis=1)[:, width - k, None]
    selected = scores >= kth
    surplus = selected.sum(1) > k
    if surplus.any():
        selected[surplus] = _latest_of_tied(scores[surplus], kth[surplus], k)
    return np.nonzero(selected)[1].reshape(n, k).astype(np.int32)  # row-major: ascending per row


def _latest_of_tied(scores: np.ndarray, kth: np.ndarray, k: int) -> np.ndarray:
    """Rows where more scores equal the k-th value than fit: keep the latest of the tied."""
    greater = scores > kth
    tied = scores == kth
    need = k - greater.sum(1, keepdims=True)
    from_right = np.cumsum(tied[:, ::-1], axis=1)[:, ::-1]
    return greater | (tied & (from_right <= need))


def padded_to_lists(padded: np.ndarray) -> pa.ListArray:
    """A -1-padded (n, k) matrix as an Arrow list<int32> column (no Python objects)."""
    valid = padded >= 0
    offsets = np.zeros(len(padded) + 1, dtype=np.int32)
    np.cumsum(valid.sum(1), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(padded[valid].astype(np.int32)))


def history_indices(pos: np.ndarray, k: int, retrieved=None) -> np.ndarray:
    """(n, k) int64 indices into each sample's user sequence, chronological, -1 padded on the left:
    the retrieved ones when `retrieved` is given (a retrieval-output column: Arrow lists, or the
    (n, k) matrix they pad to), else the last k behaviours before pos.

    The one rule for which behaviours a sample reads: the CRM's batches, the LLM's prompts and
    R_c, and CRM scoring all take their histories from here.
    """
    if retrieved is None:
        return recent_indices(pos, k).astype(np.int64)
    if isinstance(retrieved, (pa.Array, pa.ChunkedArray)):
        return lists_to_padded(retrieved, k).astype(np.int64)
    retrieved = np.asarray(retrieved)
    if retrieved.ndim != 2 or retrieved.shape[1] != k:
        raise ValueError(
            f"the retrieved histories hold {retrieved.shape[-1]} behaviours per sample, the config asks for {k}"
        )
    return retrieved.astype(np.int64)


def lists_to_padded(column: pa.ChunkedArray | pa.ListArray, k: int) -> np.ndarray:
    """The inverse of `padded_to_lists`: (n, k) int32, each list right-aligned, -1 padded on the
    left; a list longer than k is an error. Slices keep their offsets."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    if len(lengths) and lengths.max(initial=0) > k:
        raise ValueError(f"a history list holds {lengths.max()} entries, more than k={k}")
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int32)
    n = len(lengths)
    out = np.full((n, k), -1, dtype=np.int32)
    row = np.repeat(np.arange(n), lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # 0..len-1 per row
    out[row, k - np.repeat(lengths, lengths) + within] = values[np.repeat(offsets[:-1], lengths) + within]
    return out

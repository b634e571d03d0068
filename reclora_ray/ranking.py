"""Ranking metrics of the next-item task: HR@k, NDCG@k, MRR over fixed candidate sets.

The target's rank is 1 + the number of other candidates scored at least as high: ties count
against the model, so a constant scorer ranks every target last, never first.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def target_ranks(scores, target_index) -> np.ndarray:
    """1-based rank of each row's target among its candidates: scores (n, C), target_index (n,)."""
    scores = np.asarray(scores, dtype=np.float64)
    target_index = np.asarray(target_index, dtype=np.int64)
    if scores.ndim != 2 or target_index.shape != (len(scores),):
        raise ValueError(f"scores {scores.shape} must be (n, C) and target_index {target_index.shape} (n,)")
    if len(scores) == 0:
        raise ValueError("cannot rank zero rows")
    if not np.isfinite(scores).all():
        raise ValueError("candidate scores contain NaN or inf")
    if (target_index < 0).any() or (target_index >= scores.shape[1]).any():
        raise ValueError(f"target_index outside 0..{scores.shape[1] - 1}")
    target = scores[np.arange(len(scores)), target_index][:, None]
    return (scores >= target).sum(axis=1)  # the target itself counts once: rank >= 1


def per_row_metrics(ranks: np.ndarray, ks=KS) -> dict[str, np.ndarray]:
    """Each row's HR@k, NDCG@k (one relevant item: 1 / log2(rank + 1) within the top k) and RR."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = hit.astype(np.float64)
        if k > 1:
            out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
    out["mrr"] = 1.0 / ranks
    return out


def ranking_metrics(scores, target_index, ks=KS) -> dict[str, float]:
    """Means of per_row_metrics, and n."""
    rows = per_row_metrics(target_ranks(scores, target_index), ks)
    return {name: float(values.mean()) for name, values in rows.items()} | {"n": int(len(scores))}


def chance_metrics(candidates: int, ks=KS) -> dict[str, float]:
    """What a random order of `candidates` scores in expectation (the target equally likely at
    every rank): HR@k = k / C, MRR = H_C / C; the floor a ranking table is read against."""
    rows = per_row_metrics(np.arange(1, candidates + 1), ks)
    return {name: float(values.mean()) for name, values in rows.items()}

"""R_c (and predictions) from a trained CRM, in batches, without Ray.

Three entry points, all through `features.FeatureEncoder`:
  represent_samples   any samples DataFrame + their history indices (the tuning / scoring stages)
  represent_request   one user, candidate items and an ad-hoc history (serve time)
  represent_split     every sample of a prepared split, in row order (the export)
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch

from reclora_ray.crm.dataset import iter_split
from reclora_ray.crm.features import FeatureEncoder
from reclora_ray.crm.models import CRM
from reclora_ray.data.prepared import PreparedData

DEFAULT_BATCH = 4096


def _as_tensors(batch: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    return {key: torch.as_tensor(value, device=device) for key, value in batch.items()}


@torch.no_grad()
def _run(model: CRM, batches: Iterable[dict[str, np.ndarray]], fn: Callable, batch_size: int) -> torch.Tensor:
    """fn(model, batch) over batches, re-cut to batch_size rows, concatenated on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for batch in batches:
        n = len(batch["user"])
        for start in range(0, n, batch_size):
            part = {key: value[start:start + batch_size] for key, value in batch.items()}
            outputs.append(fn(model, _as_tensors(part, device)).float().cpu())
    if not outputs:
        return torch.empty(0)
    return torch.cat(outputs)


def _represent(model: CRM, batch) -> torch.Tensor:
    return model.represent(batch)


def _probability(model: CRM, batch) -> torch.Tensor:
    return torch.sigmoid(model(batch))


def represent_samples(model: CRM, prepared: PreparedData, samples: pd.DataFrame, hist_indices: np.ndarray,
                      batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """R_c (n, d_c) of samples (columns user_id, item_id, timestamp) whose histories are
    `hist_indices` (n, k): indices into each user's sequence, -1 padded (retrieved hist_long, or
    `Sequences.recent`)."""
    user_ids = samples["user_id"].to_numpy()
    hist_indices = np.asarray(hist_indices)
    if len(hist_indices) != len(samples):
        raise ValueError(f"hist_indices has {len(hist_indices)} rows for {len(samples)} samples")
    encoder = FeatureEncoder(model.spec)

    def batches():
        for start in range(0, len(samples), batch_size):
            rows = slice(start, start + batch_size)
            users, indices = user_ids[rows], hist_indices[rows]
            yield encoder.encode(users, samples["item_id"].to_numpy()[rows], samples["timestamp"].to_numpy()[rows],
                                 prepared.sequences.gather(users, indices, "item_ids"),
                                 prepared.sequences.gather(users, indices, "ratings"))

    return _run(model, batches(), _represent, batch_size)


def represent_request(model: CRM, user_id: int, item_ids, hist_item_ids, hist_ratings,
                      timestamp: int) -> torch.Tensor:
    """R_c (n_candidates, d_c) for one user scoring candidate items at `timestamp`, given the
    user's history (item ids and ratings, chronological; longer than the CRM's K keeps the last K)."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    history = np.asarray(hist_item_ids, dtype=np.int64).reshape(1, -1)
    ratings = np.asarray(hist_ratings, dtype=np.float32).reshape(1, -1)
    if history.shape != ratings.shape:
        raise ValueError(f"{history.shape[1]} history items but {ratings.shape[1]} ratings")
    n = len(item_ids)
    batch = FeatureEncoder(model.spec).encode(
        np.full(n, user_id), item_ids, np.full(n, timestamp), np.repeat(history, n, 0), np.repeat(ratings, n, 0))
    return _run(model, [batch], _represent, max(n, 1))


def represent_split(model: CRM, prepared: PreparedData, split: str, batch_size: int = DEFAULT_BATCH,
                    chunk_rows: int = 65536) -> torch.Tensor:
    """R_c of every sample of a split, in the split's row order, with the CRM's own history."""
    return _run(model, iter_split(prepared, split, model.spec, chunk_rows), _represent, batch_size)


def predict_split(model: CRM, prepared: PreparedData, split: str, batch_size: int = DEFAULT_BATCH,
                  chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(labels, P(label = 1)) of every sample of a split, in row order."""
    labels: list[np.ndarray] = []

    def batches():
        for chunk in iter_split(prepared, split, model.spec, chunk_rows):
            labels.append(chunk["label"])
            yield chunk

    probs = _run(model, batches(), _probability, batch_size).numpy()
    return np.concatenate(labels), probs

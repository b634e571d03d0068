"""A trained CRM's predictions on a prepared split, in batches, without Ray (its test metrics).

R_c itself has one path: `CRM.representation(batch, lora.gate_input)` on the batch `features.FeatureEncoder` builds,
called by the personalized LoRA's gate (llm/model.py `crm_repr`) for tuning, scoring and serving.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from reclora_ray.crm.dataset import iter_split
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
            part = {key: value[start : start + batch_size] for key, value in batch.items()}
            outputs.append(fn(model, _as_tensors(part, device)).float().cpu())
    if not outputs:
        return torch.empty(0)
    return torch.cat(outputs)


def _probability(model: CRM, batch) -> torch.Tensor:
    return torch.sigmoid(model(batch))


def predict_split(
    model: CRM, prepared: PreparedData, split: str, batch_size: int = DEFAULT_BATCH, chunk_rows: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, P(label = 1)) of every sample of a split, in row order."""
    labels: list[np.ndarray] = []

    def batches():
        for chunk in iter_split(prepared, split, model.spec, chunk_rows):
            labels.append(chunk["label"])
            yield chunk

    probs = _run(model, batches(), _probability, batch_size).numpy()
    return np.concatenate(labels), probs

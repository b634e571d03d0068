"""The paper's metrics: AUC, LogLoss and Rel.Impr (relative AUC improvement)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

EPS = 1e-7


def binary_metrics(labels, probs) -> dict[str, float]:
    """AUC and LogLoss of predicted probabilities; AUC is NaN when only one class is present."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    if labels.shape != probs.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and probabilities {probs.shape} must be equal 1-d arrays")
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or inf")
    auc = float(roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan")
    return {"auc": auc, "logloss": float(log_loss(labels, probs, labels=[0, 1])), "n": int(len(labels))}


def rel_impr(ours_auc: float, baseline_auc: float) -> float:
    """Relative AUC improvement of ours over a baseline, as the paper's Table 2 (a fraction)."""
    return (ours_auc - baseline_auc) / baseline_auc

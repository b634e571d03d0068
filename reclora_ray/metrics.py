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


def user_bootstrap(values, users, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of per-row `values` and its bootstrap CI, resampling users (all of a user's rows
    together) with replacement. For a paired comparison pass the per-row differences of two
    models on the same rows; `p_le_0` is then the share of resamples whose mean is <= 0."""
    values = np.asarray(values, dtype=np.float64)
    users = np.asarray(users)
    if values.shape != users.shape or values.ndim != 1 or len(values) == 0:
        raise ValueError(f"values {values.shape} and users {users.shape} must be equal non-empty 1-d arrays")
    _, group = np.unique(users, return_inverse=True)
    n_users = int(group.max()) + 1
    sums = np.bincount(group, weights=values, minlength=n_users)
    counts = np.bincount(group, minlength=n_users).astype(np.float64)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=n_boot).astype(np.float64)
    means = (weights @ sums) / (weights @ counts)
    tail = (1 - level) / 2
    return {"mean": float(values.mean()), "lo": float(np.quantile(means, tail)), "hi": float(np.quantile(means, 1 - tail)),
            "p_le_0": float((means <= 0).mean()), "n_users": n_users}

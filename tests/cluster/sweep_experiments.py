"""Experiments for sweep tests: a small real one (logistic regression by gradient descent on a
synthetic click log, its hyperparameters taken from the config like a CRM's), and one that
walks through the upstream stages' outputs the way the pipeline does."""

import json
import os
import time

import numpy as np
import ray
from sklearn.metrics import log_loss, roc_auc_score

from reclora_ray import stages
from reclora_ray.cluster.sweep import shared_stages
from reclora_ray.config import Config
from reclora_ray.rundir import RunDir, check_can_write, staged_output


def slow_fit(cfg: Config, out: str) -> dict:
    """`fit` that holds its CPU for a while first, so that experiments started a few seconds
    apart (Tune starts trials one after another) overlap and must use different nodes."""
    time.sleep(8)
    return fit(cfg, out)


def fit(cfg: Config, out: str) -> dict:
    started = time.time()
    if cfg.crm.lr >= 10:  # a valid config the experiment itself refuses: a failing trial
        raise ValueError(f"crm.lr {cfg.crm.lr} diverges")
    rng = np.random.default_rng(cfg.run.seed)
    x = rng.normal(size=(20_000, cfg.crm.embed_dim))
    true_w = rng.normal(size=cfg.crm.embed_dim)
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-x @ true_w))).astype(float)
    w = np.zeros(cfg.crm.embed_dim)
    for _ in range(cfg.crm.epochs * 20):
        p = 1 / (1 + np.exp(-x @ w))
        w -= cfg.crm.lr * x.T @ (p - y) / len(x)
    p = np.clip(1 / (1 + np.exp(-x @ w)), 1e-7, 1 - 1e-7)
    metrics = {"auc": float(roc_auc_score(y, p)), "logloss": float(log_loss(y, p))}
    with staged_output(out, fingerprint=cfg.section_hash("crm")) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics))
    return {
        **metrics,
        "lr": cfg.crm.lr,
        "cpus": ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0),
        "pid": os.getpid(),
        "start": started,
        "end": time.time(),
    }


def upstream_stages(cfg: Config, out: str) -> dict:
    """The pipeline's upstream bookkeeping without its work: each shared stage of the table writes
    its outputs (fingerprinted by the sweep's key for it) unless a finished one is already there,
    and the result says which stages ran. Nested like run_pipeline's result."""
    run = RunDir(out)
    ran = []
    for name in shared_stages():
        wrote = False
        for key in stages.STAGES[name].instances(cfg, "ctr"):
            fingerprint = stages.sweep_key(name, cfg, key)
            path = stages.STAGES[name].path(run, stages.STAGES[name].config_for(cfg, key), key)
            if check_can_write(path, fingerprint, overwrite=False):
                with staged_output(path, fingerprint) as tmp:
                    (tmp / "part-0.bin").write_bytes(fingerprint.encode())
                wrote = True
        if wrote:
            ran.append(name)
    return {"ran": " ".join(ran) or "-", "models": {"plora": {"n_meta": cfg.lora.n_meta}}}


def slow(cfg: Config, out: str) -> dict:
    """Sleeps crm.epochs seconds (long enough to kill the sweep's driver meanwhile), then
    writes its output; the result says when it ran."""
    started = time.time()
    with open(f"{out}.started", "a") as marker:  # beside its output, which replaces its directory
        marker.write(f"{started}\n")
    time.sleep(cfg.crm.epochs)
    with staged_output(out, fingerprint=cfg.section_hash("crm")) as tmp:
        (tmp / "slept.txt").write_text(str(cfg.crm.epochs))
    return {"start": started, "end": time.time(), "pid": os.getpid()}

"""`reclora tune` on Ray Train + DeepSpeed (ZeRO-2, 2 CPU workers, gloo) and `reclora score`."""

import json
import os

import numpy as np
import pandas as pd
import psutil
import pytest

from reclora_ray.llm.base import load_base
from reclora_ray.llm.plora import load_adapter
from reclora_ray.llm.score import Scorer, score_variant
from reclora_ray.llm.tune import tune_variant
from reclora_ray.predictions import read_predictions
from reclora_ray.rundir import RunDir
from tests.conftest import kill_one_train_worker, tiny_config

pytestmark = pytest.mark.ray


def test_zero2_on_two_workers_resumes_after_a_killed_worker_and_scores(ray_local, tiny_run):
    cfg = tiny_config("tune.num_workers=2", "tune.epochs=2", "tune.max_failures=1", "tune.lr=5e-3")
    run = RunDir(tiny_run)
    marker = tiny_run / "killed.json"
    out = tune_variant(cfg, run, "reclora", callbacks=[kill_one_train_worker(os.getpid(), marker)])

    assert not psutil.pid_exists(json.loads(marker.read_text())["pid"])
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]  # resumed at epoch 1, not restarted
    assert [h["attempt"] for h in metrics["history"]] == [0, 1]
    assert metrics["few_shot"] == cfg.tune.few_shot and metrics["valid"] == cfg.tune.valid_subsample
    best = max(metrics["history"], key=lambda h: h["val_auc"])
    assert metrics["best_epoch"] == best["epoch"] and metrics["best_val_auc"] == best["val_auc"]
    assert metrics["dtype"] == "float32"  # the tiny config's explicit llm.dtype, as the workers resolved it
    assert all(np.isfinite(h["train_loss"]) for h in metrics["history"])
    assert not (run.root / "adapter" / ".ray-train-reclora").exists()

    base, _ = load_base(cfg.llm, device="cpu")
    adapter = load_adapter(base, out)
    assert all(layer.lora_B.abs().sum() > 0 for layer in adapter.lora_layers().values())  # it trained

    scores = score_variant(cfg, run, "reclora")
    preds = read_predictions(scores)
    test = pd.read_parquet(run.data / "samples" / "test.parquet")
    assert sorted(preds["sample_id"]) == sorted(test["sample_id"])
    gates = np.stack(preds["gate"].to_numpy())
    assert gates.shape == (len(test), cfg.lora.n_meta) and np.allclose(gates.sum(1), 1, atol=1e-5)
    reported = json.loads((scores / "metrics.json").read_text())
    assert reported["n"] == len(test) and 0 <= reported["auc"] <= 1 and reported["dtype"] == metrics["dtype"]

    # The batch path and a direct Scorer (the online service's core) agree sample by sample.
    from reclora_ray.llm.histories import load_samples
    from reclora_ray.llm.variants import get_variant

    rows = load_samples(run.data, "test", get_variant("reclora")).iloc[:24]
    direct = Scorer(cfg, str(run.root), "reclora")(rows)
    expected = preds.set_index("sample_id").loc[direct["sample_id"], "p_yes"].to_numpy()
    np.testing.assert_allclose(direct["p_yes"].to_numpy(), expected, atol=1e-5)

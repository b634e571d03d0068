"""`reclora run --task next-item` on the tiny run: tune on the next-item task through Ray Train +
DeepSpeed (2 workers), score through Ray Data (the CRM alone, the tuned variant), report."""

import json

import numpy as np
import pandas as pd
import pytest

from reclora_ray.base_model import load_base
from reclora_ray.curves import CURVES_FILE, read_curves
from reclora_ray.llm.plora import load_adapter
from reclora_ray.pipeline import run_next_item
from reclora_ray.predictions import read_predictions
from reclora_ray.rundir import RunDir
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray


def test_next_item_pipeline_tunes_scores_and_reports(ray_local, tiny_run):
    # 2 workers x micro-batch 8: 48 sequences are 3 optimizer steps (no warm-up: the first is at tune.lr).
    cfg = tiny_config(
        "tune.variants=[reclora]",
        "tune.few_shot=48",
        "tune.valid_subsample=16",
        "tune.lr=5e-3",
        "score.zero_shot=false",
    )
    summary = run_next_item(cfg, str(tiny_run))
    run = RunDir(tiny_run)

    test = pd.read_parquet(run.data / "next_item" / "test.parquet")
    assert set(summary["models"]) == {"crm-sim", "reclora"}
    for name in summary["models"]:
        preds = read_predictions(run.next_item_scores(name))
        assert sorted(preds["sample_id"]) == sorted(test["sample_id"])
        scores = np.stack(preds["scores"].to_numpy())
        assert scores.shape == (len(test), 20) and np.isfinite(scores).all()
        m = summary["models"][name]
        assert m["n"] == len(test) and 0 <= m["hr@1"] <= m["hr@5"] <= 1
        assert m["hr@1_ci"][0] <= m["hr@1"] <= m["hr@1_ci"][1]
    assert set(summary["paired"]) == {"crm-sim - reclora"}

    trained = json.loads((run.next_item_adapter("reclora") / "train_metrics.json").read_text())
    assert trained["few_shot"] == 48 and np.isfinite(trained["history"][0]["train_loss"])
    # The stage both tasks share (tune.fit_adapter): the epoch kept by validation HR@1, the dtype recorded.
    best = max(trained["history"], key=lambda h: (h["val_hr1"], h["epoch"]))
    assert (trained["best_epoch"], trained["best_val_hr1"]) == (best["epoch"], best["val_hr1"])
    assert trained["dtype"] == "float32" and trained["valid"] > 0
    curves = read_curves(run.next_item_adapter("reclora") / CURVES_FILE)
    assert len([c for c in curves if c["kind"] == "step"]) == 3 and all(
        np.isfinite(c["loss"]) for c in curves if c["kind"] == "step"
    )
    assert [(c["epoch"], c["hr1"]) for c in curves if c["kind"] == "epoch"] == [
        (h["epoch"], h["val_hr1"]) for h in trained["history"]
    ]
    adapter = load_adapter(load_base(cfg.llm, device="cpu")[0], run.next_item_adapter("reclora"))
    assert all(layer.lora_B.abs().sum() > 0 for layer in adapter.lora_layers().values())  # it trained
    report = (run.root / "next-item" / "report.md").read_text()
    assert "| RecLoRA |" in report and "| SIM |" in report and "crm-sim - reclora" in report
    # The CTR outputs are untouched: the task's own live under OUT/next-item.
    assert not (run.root / "adapter" / "reclora").exists()

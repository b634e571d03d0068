"""Scoring through Ray Data end to end on the tiny run: a split larger than score.batch_size x
actors is read, scored and written by the workers as several Parquet shards, and the metrics the
workers compute over the shards equal sklearn's on all the predictions."""

import json
import logging

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from reclora_ray import predictions
from reclora_ray.llm.histories import fixed_subsample, load_samples
from reclora_ray.llm.score import score_crm, score_variant
from reclora_ray.predictions import read_predictions, shard_files
from reclora_ray.report import write_report
from reclora_ray.rundir import MARKER, RunDir
from reclora_ray.variants import get_variant
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray


def test_a_split_is_scored_into_shards_and_its_metrics_equal_sklearns(ray_local, tiny_run, monkeypatch):
    monkeypatch.setattr(predictions, "ROWS_PER_SHARD", 48)  # a file per 48 rows at least, not 100,000
    monkeypatch.setattr(predictions, "LOCAL_ROWS", 0)  # the metrics by Ray Data, as for a large split
    cfg = tiny_config("score.batch_size=8", "score.concurrency=1", "score.zero_shot=false")
    run = RunDir(tiny_run)
    test = pd.read_parquet(run.data / "samples" / "test.parquet")
    # Larger than batch_size x actors, and than the rows one actor call takes (batch_size x 8, >= 128).
    assert len(test) > max(cfg.score.batch_size * 8, 128) > cfg.score.batch_size * cfg.score.concurrency

    out = score_crm(cfg, run)
    files = shard_files(out)
    assert len(files) >= 2 and {p.parent.name for p in files} == {"predictions"}
    assert not (out / "predictions.parquet").exists() and (out / MARKER).is_file()
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == len(test)

    preds = read_predictions(out)
    assert preds["sample_id"].tolist() == sorted(test["sample_id"])  # sorted as the single file was
    assert list(preds.columns[:6]) == ["sample_id", "user_id", "user_raw_id", "item_id", "item_raw_id", "label"]
    users = pd.read_parquet(run.data / "users.parquet").set_index("user_id")["raw_id"]
    assert preds["user_raw_id"].tolist() == users.loc[preds["user_id"]].tolist()
    expected = test.set_index("sample_id").loc[preds["sample_id"]]
    assert (preds["label"].to_numpy() == expected["label"].to_numpy()).all()

    metrics = json.loads((out / "metrics.json").read_text())
    p = np.clip(preds["p_yes"].to_numpy(np.float64), 1e-7, 1 - 1e-7)
    assert metrics["n"] == len(test)
    assert metrics["auc"] == pytest.approx(roc_auc_score(preds["label"], p), abs=1e-12)
    assert metrics["logloss"] == pytest.approx(log_loss(preds["label"], p), rel=1e-12)
    monkeypatch.setattr(predictions, "LOCAL_ROWS", len(test))  # read on the driver: the same figures
    local = predictions.binary_metrics_of(out)
    assert local["n"] == metrics["n"] and local["auc"] == metrics["auc"]
    assert local["logloss"] == pytest.approx(metrics["logloss"], rel=1e-12)
    # The same rows and values as the CRM scorer on the whole frame in this process.
    from reclora_ray.llm.score import CRMScorer

    direct = CRMScorer(cfg, str(run.root), str(run.crm("sim")), "semantic")(
        load_samples(run.data, "test", get_variant("reclora"))
    )
    np.testing.assert_allclose(
        preds["p_yes"].to_numpy(), direct.sort_values("sample_id")["p_yes"].to_numpy(), atol=1e-6
    )


def test_llm_rows_score_the_fixed_subsample_and_the_report_reads_the_shards(ray_local, tiny_run, monkeypatch, caplog):
    monkeypatch.setattr(predictions, "ROWS_PER_SHARD", 16)
    cfg = tiny_config("score.batch_size=8", "score.llm_subsample=40", "score.zero_shot=true", "tune.variants=[]")
    run = RunDir(tiny_run)
    score_crm(cfg, run)
    caplog.set_level(logging.INFO, logger="reclora_ray.llm.score")
    out = score_variant(cfg, run, "zero-shot")
    assert "scoring zero-shot on 40 test samples (score.llm_subsample 40)" in caplog.text  # the rows it scores
    assert len(shard_files(out)) >= 2
    preds = read_predictions(out)
    test = pd.read_parquet(run.data / "samples" / "test.parquet")
    subsample = fixed_subsample(test.sort_values("sample_id"), 40, cfg.run.seed)
    assert preds["sample_id"].tolist() == subsample["sample_id"].tolist()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dtype"] == "float32" and metrics["n"] == 40
    assert set(preds["dtype"]) == {"float32"}

    payload = write_report(run, rounds=50)
    assert payload["models"]["zero-shot"]["n"] == 40 and payload["own_samples"]["crm-sim"]["n"] == len(test)
    for name, m in payload["models"].items():
        own = read_predictions(run.scores(name)).set_index("sample_id").loc[preds["sample_id"]]
        assert m["auc"] == pytest.approx(roc_auc_score(own["label"], np.clip(own["p_yes"], 1e-7, 1 - 1e-7)))
    crm = json.loads((run.scores("crm-sim") / "metrics.json").read_text())
    assert payload["own_samples"]["crm-sim"]["auc"] == pytest.approx(crm["auc"], abs=1e-12)

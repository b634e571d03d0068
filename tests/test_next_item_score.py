"""Next-item scoring through the shared Ray Data helper on the tiny run: fingerprints over the
upstream outputs' identities, and iLoRA's generate-and-match on a fixed subsample."""

import json

import numpy as np
import pandas as pd
import pytest

from reclora_ray.crm.train import pretrain_crm
from reclora_ray.data.prepared import PreparedData
from reclora_ray.llm.model import causal_lm
from reclora_ray.llm.next_item import match_answer
from reclora_ray.llm.next_item_report import write_next_item_report
from reclora_ray.llm.next_item_score import (
    NOT_GENERATED,
    NextItemScorer,
    load_rows,
    score_next_item,
    score_next_item_crm,
    split_path,
)
from reclora_ray.predictions import read_predictions
from reclora_ray.rundir import RunDir, StageOutputExists, identity
from reclora_ray.scoring import subsample_ids
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray


def test_retrained_crm_makes_the_next_item_crm_scores_stale_and_not_the_llms(ray_local, tiny_run):
    cfg = tiny_config("score.next_item.generate=0")
    run = RunDir(tiny_run)
    crm_scores = score_next_item_crm(cfg, run, "reclora")
    llm_scores = score_next_item(cfg, run, "zero-shot")
    before = identity(crm_scores), identity(llm_scores)
    assert score_next_item_crm(cfg, run, "reclora") == crm_scores  # up to date: skipped
    assert (identity(crm_scores), identity(llm_scores)) == before

    pretrain_crm(cfg, tiny_run, overwrite=True)  # same config, new weights

    with pytest.raises(StageOutputExists, match="next-item/scores/crm-sim was written by a different config"):
        score_next_item_crm(cfg, run, "reclora")
    assert score_next_item(cfg, run, "zero-shot") == llm_scores  # the zero-shot LLM reads no CRM: still valid
    assert identity(llm_scores) == before[1]
    score_next_item_crm(cfg, run, "reclora", overwrite=True)
    assert identity(crm_scores) != before[0]


def test_generate_and_match_on_a_fixed_subsample(ray_local, tiny_run):
    cfg = tiny_config("score.next_item.generate=6", "score.next_item.max_new_tokens=8", "score.batch_size=4")
    run = RunDir(tiny_run)
    out = score_next_item(cfg, run, "zero-shot")
    score_next_item_crm(cfg, run, "reclora")
    preds = read_predictions(out)
    test = pd.read_parquet(split_path(run, "test"))
    assert preds["sample_id"].tolist() == sorted(test["sample_id"])

    generated = preds[preds["matched"] != NOT_GENERATED]
    expected_ids = subsample_ids(split_path(run, "test"), 6, cfg.run.seed)
    assert generated["sample_id"].tolist() == expected_ids.tolist()
    assert preds.loc[preds["matched"] == NOT_GENERATED, "generated"].isna().all()
    assert generated["generated"].map(lambda t: isinstance(t, str)).all()
    # Every stored answer matches as the documented rule says, against the row's own candidates.
    titles = PreparedData.load(run.data).items.sort_values("item_id")["title"].to_numpy()
    candidates = test.set_index("sample_id").loc[generated["sample_id"], "candidates"]
    again = [
        match_answer(text, titles[np.asarray(c)], cfg.score.next_item.fuzzy_cutoff)
        for text, c in zip(generated["generated"], candidates)
    ]
    assert generated["matched"].tolist() == again

    metrics = json.loads((out / "metrics.json").read_text())
    valid = generated["matched"] >= 0
    hits = (generated["matched"] == generated["target_index"]).sum()
    assert metrics["gen_n"] == 6 and metrics["valid_ratio"] == pytest.approx(valid.mean())
    assert metrics["gen_hr@1_all"] == pytest.approx(hits / 6)
    assert (
        np.isnan(metrics["gen_hr@1"]) if not valid.any() else metrics["gen_hr@1"] == pytest.approx(hits / valid.sum())
    )

    summary = write_next_item_report(run, candidates=cfg.data.next_item.candidates)
    assert summary["chance"]["hr@1"] == pytest.approx(1 / cfg.data.next_item.candidates)
    assert set(summary["generate"]) == {"zero-shot"}  # the CRM writes no answers
    assert summary["generate"]["zero-shot"]["gen_n"] == 6
    report = (run.root / "next-item" / "report.md").read_text()
    assert f"| Chance (a random order) | {1 / cfg.data.next_item.candidates:.4f} |" in report
    n_cand = cfg.data.next_item.candidates
    assert f"{n_cand} candidates per test sequence: the next item and {n_cand - 1} never-seen items" in report
    assert "## Generate and match" in report and "| Zero-shot LLM |" in report.split("## Generate and match")[1]
    assert json.loads((run.root / "next-item" / "metrics.json").read_text())["generate"] == json.loads(
        json.dumps(summary["generate"])
    )


def test_the_cpu_scorer_uses_eager_attention_with_the_same_scores(tiny_run):
    cfg = tiny_config("score.next_item.generate=0", "score.batch_size=4")
    run = RunDir(tiny_run)
    scorer = NextItemScorer(cfg, run, "zero-shot", None)
    llm = causal_lm(scorer.model.llm)
    assert llm.config._attn_implementation == "eager"
    rows = load_rows(run, "test").head(6)
    eager = scorer.scores(rows)
    llm.set_attn_implementation("sdpa")
    np.testing.assert_allclose(scorer.scores(rows), eager, atol=1e-5)

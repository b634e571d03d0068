import json

import numpy as np
import pandas as pd
import pytest

from reclora_ray.report import comparison_table, write_report
from reclora_ray.rundir import RunDir


def _score(run, name, sample_ids, labels, probs, gates=None):
    d = run.scores(name)
    d.mkdir(parents=True)
    df = pd.DataFrame(
        {"sample_id": sample_ids, "user_id": np.asarray(sample_ids) % 25, "item_id": 0, "label": labels, "p_yes": probs}
    )
    if gates is not None:
        df["gate"] = list(gates)
    df.to_parquet(d / "predictions.parquet")
    from reclora_ray.metrics import binary_metrics

    (d / "metrics.json").write_text(json.dumps(binary_metrics(labels, probs)))


def _run(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1000)
    run = RunDir(tmp_path)
    ids = np.arange(1000)
    sub = np.sort(rng.choice(1000, 400, replace=False))  # the LLM rows' test subsample
    crm = np.clip(labels * 0.2 + rng.random(1000) * 0.8, 0, 1)
    _score(run, "crm-sim", ids, labels, crm)  # the CRM scores the whole split
    _score(run, "zero-shot", sub, labels[sub], rng.random(400))
    _score(
        run,
        "reclora",
        sub,
        labels[sub],
        np.clip(labels[sub] * 0.3 + rng.random(400) * 0.7, 0, 1),
        gates=rng.dirichlet(np.ones(4), 400),
    )
    return run, labels, crm, sub


def test_models_are_compared_on_the_samples_they_all_scored(tmp_path):
    run, labels, crm, sub = _run(tmp_path)
    payload = write_report(run, notes=["test note"], rounds=200)

    assert set(payload["models"]) == {"crm-sim", "zero-shot", "reclora"}
    assert {m["n"] for m in payload["models"].values()} == {400}
    from reclora_ray.metrics import binary_metrics

    assert payload["models"]["crm-sim"]["auc"] == pytest.approx(binary_metrics(labels[sub], crm[sub])["auc"])
    assert payload["own_samples"]["crm-sim"]["n"] == 1000  # and separately on its whole split
    assert payload["own_samples"]["crm-sim"]["auc"] == pytest.approx(binary_metrics(labels, crm)["auc"])
    for m in payload["models"].values():
        assert m["auc_ci"][0] < m["auc"] < m["auc_ci"][1] and m["logloss_ci"][0] < m["logloss"] < m["logloss_ci"][1]
    versus = payload["vs_reclora"]
    assert set(versus) == {"crm-sim", "zero-shot"}
    assert versus["zero-shot"]["delta_auc"] > 0.2 and versus["zero-shot"]["p_value"] < 0.01
    assert versus["zero-shot"]["delta_auc_ci"][0] > 0

    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(payload))
    report = (tmp_path / "report.md").read_text()
    assert "same 400 test samples (25 users)" in report
    table = report[: report.index("Models that also scored")]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["SIM", "Zero-shot LLM", "RecLoRA"]
    ours, zs = payload["models"]["reclora"]["auc"], payload["models"]["zero-shot"]["auc"]
    assert f"{100 * (ours - zs) / zs:+.2f}%" in rows[1] and "< 0.005" in rows[1]
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert (tmp_path / "gates.png").stat().st_size > 1000
    assert "test note" in report


def test_rows_that_share_no_sample_are_refused(tmp_path):
    run = RunDir(tmp_path)
    _score(run, "crm-sim", np.arange(0, 50), np.arange(50) % 2, np.linspace(0, 1, 50))
    _score(run, "reclora", np.arange(50, 100), np.arange(50) % 2, np.linspace(0, 1, 50))
    with pytest.raises(ValueError, match="share no test sample"):
        write_report(run, rounds=20)


def test_table_without_ours_has_no_comparison():
    payload = {
        "models": {
            "crm-din": {
                "auc": 0.7,
                "auc_ci": [0.68, 0.72],
                "logloss": 0.6,
                "logloss_ci": [0.58, 0.62],
                "n": 10,
                "users": 3,
            }
        }
    }
    assert (
        comparison_table(payload).splitlines()[-1]
        == "| DIN | ID-based | 0.7000 [0.6800, 0.7200] | 0.6000 [0.5800, 0.6200] | - | - | - |"
    )


def test_the_report_stage_alone_writes_what_the_run_was_under_its_config(tmp_path):
    """`reclora report --config X` used to ignore X: only `reclora run`, which passes stage times, wrote notes."""
    from reclora_ray.report import run_stage
    from tests.conftest import tiny_config

    run, *_ = _run(tmp_path)
    cfg = tiny_config("score.llm_subsample=400")
    run_stage(cfg, run)
    report = (tmp_path / "report.md").read_text()
    assert f"dataset {cfg.data.dataset}; LLM {cfg.llm.model}" in report
    assert "fixed random subsample of 400 samples" in report and "stage wall times" not in report
    run_stage(cfg, run, timings={"prepare": 1.5})
    assert "stage wall times (s): prepare 1.5" in (tmp_path / "report.md").read_text()

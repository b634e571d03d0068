import json

import numpy as np
import pandas as pd

from reclora_ray.report import comparison_table, write_report
from reclora_ray.rundir import RunDir


def _score(run, name, labels, probs, gates=None):
    d = run.scores(name)
    d.mkdir(parents=True)
    df = pd.DataFrame({"sample_id": range(len(labels)), "user_id": np.arange(len(labels)) % 5,
                       "item_id": 0, "label": labels, "p_yes": probs})
    if gates is not None:
        df["gate"] = list(gates)
    df.to_parquet(d / "predictions.parquet")
    from reclora_ray.metrics import binary_metrics

    (d / "metrics.json").write_text(json.dumps(binary_metrics(labels, probs)))


def test_report_table_plots_and_metrics(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    run = RunDir(tmp_path)
    _score(run, "crm-sim", labels, np.clip(labels * 0.3 + rng.random(400) * 0.7, 0, 1))
    _score(run, "zero-shot", labels, rng.random(400))
    _score(run, "reclora", labels, np.clip(labels * 0.5 + rng.random(400) * 0.5, 0, 1),
           gates=rng.dirichlet(np.ones(4), 400))
    payload = write_report(run, notes=["test note"])

    assert set(payload["models"]) == {"crm-sim", "zero-shot", "reclora"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == payload
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["SIM", "Zero-shot LLM", "RecLoRA"]
    ours = payload["models"]["reclora"]["auc"]
    zs = payload["models"]["zero-shot"]["auc"]
    assert f"{100 * (ours - zs) / zs:+.2f}%" in rows[1]
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert (tmp_path / "gates.png").stat().st_size > 1000
    assert "test note" in report


def test_table_without_ours_has_no_impr():
    table = comparison_table({"crm-din": {"auc": 0.7, "logloss": 0.6, "n": 10}})
    assert table.splitlines()[-1] == "| DIN | ID-based | 0.7000 | 0.6000 | - | 10 |"

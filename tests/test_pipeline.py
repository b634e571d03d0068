"""`reclora run` end to end on the tiny config: every stage, the report, and a no-op re-run."""

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest

from reclora_ray.curves import CURVES_FILE, read_curves
from reclora_ray.pipeline import run_pipeline, run_tuning
from reclora_ray.predictions import shard_files
from reclora_ray.rundir import RunDir
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def test_run_scores_every_model_into_one_report_and_reruns_as_a_no_op(ray_local, tiny_run):
    cfg = tiny_config("tune.variants=[reclora,tallrec]")
    run = RunDir(tiny_run)
    # A sweep's selection experiment: the run up to tuning, nothing scored on test.
    tuned = run_tuning(cfg, str(tiny_run))
    assert set(tuned["valid"]) == {"reclora", "tallrec"} and not run.scores("reclora").exists()
    for variant, row in tuned["valid"].items():
        kept = json.loads((run.adapter(variant) / "train_metrics.json").read_text())
        assert row["auc"] == kept["best_val_auc"] and row["samples"] == kept["valid"] > 0 and row["logloss"] > 0

    metrics = run_pipeline(cfg, str(tiny_run))  # takes the adapters tuned above
    assert metrics["valid"] == tuned["valid"]  # the figures selection used, beside the test's
    assert set(metrics["models"]) == {"crm-sim", "zero-shot", "reclora", "tallrec"}
    assert json.loads((tiny_run / "metrics.json").read_text()) == metrics
    n_test = len(pd.read_parquet(run.data / "samples" / "test.parquet"))
    for name, row in metrics["models"].items():
        assert row["n"] == n_test and 0 <= row["auc"] <= 1 and row["logloss"] > 0, name
    report = (tiny_run / "report.md").read_text()
    for label in ("SIM", "Zero-shot LLM", "TALLRec-style LoRA", "RecLoRA", "Rel.Impr", "few-shot set: 64"):
        assert label in report
    assert (tiny_run / "roc.png").stat().st_size > 0 and (tiny_run / "gates.png").stat().st_size > 0
    assert (tiny_run / "config.yaml").is_file()
    # Curves of every tuned variant (and the CRM), plotted in the report and sent to TensorBoard.
    for variant in ("reclora", "tallrec"):
        curves = read_curves(run.adapter(variant) / CURVES_FILE)
        micro_batches = cfg.tune.few_shot // (cfg.tune.micro_batch * cfg.tune.num_workers)  # on rank 0, one epoch
        assert [r["step"] for r in curves if r["kind"] == "step"] == list(range(micro_batches))
        assert [r["epoch"] for r in curves if r["kind"] == "epoch"] == [0]
        assert list((tiny_run / "tracking" / f"tune-{variant}").glob("events.out.tfevents.*"))
    assert "![Training loss and validation curves](curves.png)" in report
    assert (tiny_run / "curves.png").stat().st_size > 0

    stamps = {
        p: p.stat().st_mtime_ns
        for p in (
            run.adapter("reclora") / "_SUCCESS.json",
            run.scores("reclora") / "_SUCCESS.json",
            *shard_files(run.scores("reclora")),
        )
    }
    assert run_pipeline(cfg, str(tiny_run)) == metrics  # everything done: nothing is redone
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # The upper-bound diagnostic (bench/blend_upper_bound.py) reads a finished run as it is.
    blend = run_bench("blend_upper_bound", ["--run", str(tiny_run), "--variants", "tallrec"])["tallrec"]
    assert blend["test"]["n"] == n_test and blend["valid"]["n"] == cfg.tune.valid_subsample
    assert blend["test"]["crm"]["auc"] == pytest.approx(metrics["models"]["crm-sim"]["auc"])
    assert blend["test"]["llm"]["auc"] == pytest.approx(metrics["models"]["tallrec"]["auc"])
    assert 0 <= blend["test"]["blend"]["auc"] <= 1 and len(blend["valid"]["coef_crm_llm"]) == 2


def run_bench(name: str, argv: list[str]) -> dict:
    """A bench script's main() in this process; its last line of output, a JSON object."""
    import contextlib
    import importlib.util
    import io
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, argv_before = io.StringIO(), sys.argv
    sys.argv = [name, *argv]
    try:
        with contextlib.redirect_stdout(out):
            module.main()
    finally:
        sys.argv = argv_before
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_reclora_run_ends_with_the_reports_table_not_the_metrics_json(tmp_path, capsys, monkeypatch):
    from reclora_ray import pipeline

    report = tmp_path / "report.md"
    report.write_text(
        "# RecLoRA run report\n\n| Model | AUC |\n|---|---|\n| SIM | 0.77 |\n\n![ROC curves](roc.png)\n\n## Notes\n- x\n"
    )
    assert pipeline.headline(report) == "# RecLoRA run report\n\n| Model | AUC |\n|---|---|\n| SIM | 0.77 |"
    monkeypatch.setattr(pipeline, "run_task", lambda *a, **k: {"models": {"sim": {"auc": 0.77}}})
    args = argparse.Namespace(config="tiny", overrides=[], out=str(tmp_path), task="ctr", overwrite=False)
    assert pipeline.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# RecLoRA run report") and "| SIM | 0.77 |" in printed and "Notes" not in printed
    assert printed.rstrip().endswith(f"with its plots: {report}") and '"auc"' not in printed

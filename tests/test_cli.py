"""`reclora` stages at a URI --out: tune, score and run on a `file://` run directory (the path
s3:// and gs:// take through pyarrow; no object-store emulator is installed here)."""

import json
import shutil

import pytest

from reclora_ray import cli
from reclora_ray.rundir import MARKER, RunDir
from tests.conftest import TINY_OVERRIDES


def sets(*overrides: str) -> list[str]:
    return [arg for o in (*TINY_OVERRIDES, *overrides) for arg in ("--set", o)]


def test_a_command_without_uri_support_refuses_a_uri(tmp_path, caplog):
    assert cli.main(["synth", "--rows", "10", "--out", f"file://{tmp_path}/raw"]) == 2
    assert "reclora synth --out file://" in caplog.text and "local path only" in caplog.text
    assert not (tmp_path / "raw").exists()


@pytest.mark.ray
def test_tune_score_and_run_read_and_write_a_uri_run_directory(ray_local, tiny_upstream, tmp_path, monkeypatch):
    bucket = tmp_path / "bucket" / "run"
    shutil.copytree(tiny_upstream, bucket, symlinks=True)  # data, embeddings, retrieval, crm/sim at the URI
    uri, run = f"file://{bucket}", RunDir(bucket)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("RECLORA_SCRATCH", str(scratch))
    # gradient checkpointing on: the ml-1m-1gpu setting, through Ray Train + DeepSpeed here
    args = [
        "--config",
        "tiny",
        *sets("tune.variants=[reclora]", "score.zero_shot=false", "tune.gradient_checkpointing=true"),
        "--out",
        uri,
    ]

    assert cli.main(["tune", *args]) == 0
    adapter = run.adapter("reclora")
    assert (adapter / MARKER).is_file() and (adapter / "config.yaml").is_file()
    assert list(scratch.iterdir()) == []  # the staged run directory is gone
    assert cli.main(["score", "--variant", "reclora", *args]) == 0
    scores = run.scores("reclora")
    assert {p.name for p in scores.iterdir()} >= {MARKER, "predictions", "metrics.json"}
    assert list((scores / "predictions").glob("*.parquet"))  # Parquet shards written by Ray Data

    stamps = {p: p.stat().st_mtime_ns for p in (adapter / MARKER, *(scores / "predictions").glob("*.parquet"))}
    assert cli.main(["run", *args]) == 0  # tune and score are done at the URI: only the CRM row and the report
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    metrics = json.loads((bucket / "metrics.json").read_text())
    assert set(metrics["models"]) == {"crm-sim", "reclora"}
    reported = json.loads((scores / "metrics.json").read_text())
    # The report (sklearn on the rows read back) and the scoring stage (computed by the workers over the shards).
    assert {k: metrics["models"]["reclora"][k] for k in ("auc", "logloss", "n")} == pytest.approx(
        {k: reported[k] for k in ("auc", "logloss", "n")}, rel=1e-12
    )
    assert "RecLoRA" in (bucket / "report.md").read_text() and (bucket / "config.yaml").is_file()
    assert (run.scores("crm-sim") / MARKER).is_file()
    assert list(scratch.iterdir()) == []

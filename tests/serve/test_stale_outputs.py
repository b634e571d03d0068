"""Retraining the CRM invalidates what was built on it: the adapter, the scores and the served
model version (finding 4 of issue 21: fingerprints used to cover the config only)."""

import shutil

import pytest

from reclora_ray.crm.train import pretrain_crm
from reclora_ray.llm.score import score_crm
from reclora_ray.llm.tune import tune_variant
from reclora_ray.rundir import RunDir, StageOutputExists, identity
from reclora_ray.runtime import init_ray
from reclora_ray.serve.online import model_version
from reclora_ray.variants import get_variant

pytestmark = pytest.mark.ray


def test_retrained_crm_makes_tune_score_and_model_version_stale(tuned_run, serve_config, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tuned_run, out, symlinks=True)
    run = RunDir(out)
    init_ray(serve_config)
    scores = score_crm(serve_config, run)
    assert score_crm(serve_config, run) == scores  # up to date: skipped
    assert tune_variant(serve_config, run, "reclora") == run.adapter("reclora")  # up to date: skipped
    reclora = get_variant("reclora")
    version = model_version(serve_config, run, reclora)
    scores_identity = identity(scores)
    adapter_identity, crm_identity = identity(run.adapter("reclora")), identity(run.crm("sim"))

    pretrain_crm(serve_config, out, overwrite=True)  # same config, new weights

    assert identity(run.crm("sim")) != crm_identity
    with pytest.raises(StageOutputExists, match="adapter/reclora was written by a different config"):
        tune_variant(serve_config, run, "reclora")
    with pytest.raises(StageOutputExists, match="scores/crm-sim was written by a different config"):
        score_crm(serve_config, run)
    # The adapter on disk is still the old one, but what would be served with it is not.
    assert identity(run.adapter("reclora")) == adapter_identity
    assert model_version(serve_config, run, reclora) != version
    assert model_version(serve_config, run, reclora).startswith(adapter_identity)
    assert identity(scores) == scores_identity

"""A real run directory of the `tiny` config, built once per session by the real stages
(prepare the packaged ML-100K, embed with the tiny random LLM, retrieve, pretrain the SIM CRM),
for the tests of the stages after them. Tests copy it before writing into it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reclora_ray.config import Config, load_config

TINY_OVERRIDES = ["run.num_cpus=2", "crm.num_workers=1", "crm.cpus_per_worker=1"]


def tiny_config(*overrides: str) -> Config:
    return load_config("tiny", [*TINY_OVERRIDES, *overrides])


@pytest.fixture(scope="session")
def tiny_upstream(tmp_path_factory) -> Path:
    """OUT with data, embeddings, retrieval and crm/sim of the tiny config (read-only)."""
    import ray

    from reclora_ray.crm.train import pretrain_crm
    from reclora_ray.data.prepare import prepare_dataset
    from reclora_ray.retrieval.embed import embed_items
    from reclora_ray.retrieval.retrieve import retrieve_histories

    out = tmp_path_factory.mktemp("tiny-run")
    cfg = tiny_config()
    was_running = ray.is_initialized()
    prepare_dataset(cfg, out / "data")
    embed_items(cfg, out)
    retrieve_histories(cfg, out)
    pretrain_crm(cfg, out)
    if not was_running:
        ray.shutdown()
    return out


@pytest.fixture
def tiny_run(tiny_upstream, tmp_path) -> Path:
    """A private, writable copy of the tiny upstream run."""
    out = tmp_path / "run"
    shutil.copytree(tiny_upstream, out, symlinks=True)
    return out

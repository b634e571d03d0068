"""A real run directory of the `tiny` config, built once per session by the real stages
(prepare the packaged ML-100K, embed with the tiny random LLM, retrieve, pretrain the SIM CRM),
for the tests of the stages after them. Tests copy it before writing into it."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import psutil
import pytest

from reclora_ray.config import Config, load_config

TINY_OVERRIDES = ["run.num_cpus=2", "crm.num_workers=1", "crm.cpus_per_worker=1"]


def tiny_config(*overrides: str) -> Config:
    return load_config("tiny", [*TINY_OVERRIDES, *overrides])


@pytest.fixture(scope="session")
def tiny_upstream(tmp_path_factory, ray_local) -> Path:
    """OUT with data, embeddings, retrieval and crm/sim of the tiny config (read-only)."""
    from reclora_ray.crm.train import pretrain_crm
    from reclora_ray.data.prepare import prepare_dataset
    from reclora_ray.retrieval.embed import embed_items
    from reclora_ray.retrieval.retrieve import retrieve_histories

    out = tmp_path_factory.mktemp("tiny-run")
    cfg = tiny_config()
    prepare_dataset(cfg, out / "data")
    embed_items(cfg, out)
    retrieve_histories(cfg, out)
    pretrain_crm(cfg, out)
    return out


@pytest.fixture
def tiny_run(tiny_upstream, tmp_path) -> Path:
    """A private, writable copy of the tiny upstream run."""
    out = tmp_path / "run"
    shutil.copytree(tiny_upstream, out, symlinks=True)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local 2-CPU Ray for the session's Ray tests, started on first use. A fixture that had
    to stop it (Serve's) leaves the next stage to start a fresh one through `init_ray`."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def kill_one_train_worker(driver_pid: int, marker: Path):
    """A Ray Train callback that SIGKILLs one training worker of this test's Ray after the first
    checkpoint and records its pid and epoch in `marker` (the class is defined in a function so
    Ray ships it by value to its controller)."""
    from ray.train import UserCallback

    class KillOneWorker(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is None or marker.exists():
                return
            workers = [
                p
                for p in psutil.Process(driver_pid).children(recursive=True)
                if "RayTrainWorker" in " ".join(p.cmdline())
            ]
            victim = workers[-1]
            marker.write_text(json.dumps({"pid": victim.pid, "epoch": metrics[0]["epoch"]}))
            os.kill(victim.pid, signal.SIGKILL)

    return KillOneWorker()


@pytest.fixture(scope="session")
def ml100k_csv(tmp_path_factory, ray_local) -> Path:
    """The packaged ML-100K exported to the generic CSV layout (`reclora export-data`), read-only."""
    from reclora_ray.data.export import export_data

    return export_data("tiny", TINY_OVERRIDES, tmp_path_factory.mktemp("export") / "ml100k-csv", files=3)

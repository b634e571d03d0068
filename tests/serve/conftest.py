"""One tuned tiny run for the session and one Serve application on loopback per module."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import httpx
import pytest

from reclora_ray.config import Config
from reclora_ray.rundir import RunDir
from tests.conftest import tiny_config

# Batches wait long enough to fill on a busy 2-core machine; limits small enough to hit in tests.
SERVE_OVERRIDES = [
    "serve.max_batch_size=8",
    "serve.batch_wait_timeout_s=0.25",
    "serve.max_candidates=20",
    "serve.max_history=50",
    "serve.max_body_bytes=20000",
    "serve.num_cpus=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_config() -> Config:
    return tiny_config(*SERVE_OVERRIDES, f"serve.port={free_port()}")


@pytest.fixture(scope="session")
def tuned_run(tiny_upstream, tmp_path_factory, serve_config) -> Path:
    """The tiny upstream run plus a tuned reclora adapter (the one tuning of this session)."""
    from reclora_ray.llm.tune import tune_variant
    from reclora_ray.runtime import init_ray

    out = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(tiny_upstream, out, symlinks=True)
    init_ray(serve_config)
    tune_variant(serve_config, RunDir(out), "reclora")
    return out


@pytest.fixture(scope="module")
def service(tuned_run, serve_config):
    """(base URL, httpx client) of the app on 127.0.0.1; Serve and Ray are shut down afterwards."""
    import ray
    from ray import serve

    from reclora_ray.serve.app import start

    try:
        url = start(serve_config, tuned_run)
        with httpx.Client(base_url=url, timeout=120) as client:
            yield url, client
    finally:
        serve.shutdown()
        ray.shutdown()

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.jobs import JobClient
from tools.local_cluster import LocalCluster, session_processes

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory):
    """A head and one worker node (1 CPU each) started with cluster/local/start.sh, stopped with
    stop.sh; shared by every test of this directory (tests that add nodes remove them)."""
    root = tmp_path_factory.mktemp("cluster")
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(
        [REPO / "cluster/local/start.sh", "--dir", root, "--workers", "1", "--failure-detection-s", "3"],
        env=env,
        check=True,
        timeout=120,
    )
    cluster = LocalCluster.attach(root)
    sessions = [n.pid for n in cluster.info.nodes]
    try:
        yield cluster
    finally:
        subprocess.run([REPO / "cluster/local/stop.sh", "--dir", root], env=env, check=True, timeout=120)
        leftovers = [p for sid in sessions for p in session_processes(sid)]
        assert not leftovers, f"processes left after stop.sh: {leftovers}"


@pytest.fixture(scope="session")
def jobs(local_cluster):
    return JobClient(local_cluster.info.dashboard_url, local_cluster.info.token_file)


@pytest.fixture(scope="session")
def tiny_data(jobs, tmp_path_factory):
    """OUT/data of the tiny config (packaged ML-100K), prepared by a `ray job submit` of
    jobs/prepare_data.py on the local cluster; tests copy it into their own run directories."""
    out = tmp_path_factory.mktemp("prepared")
    job_id = jobs.submit(["python", "jobs/prepare_data.py", "--config", "tiny", "--out", str(out)], working_dir=REPO)
    jobs.wait(job_id, timeout_s=180)
    return out / "data"

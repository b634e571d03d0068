import os
import subprocess
import sys
from pathlib import Path

import pytest

from reclora_ray.cluster.local import LocalCluster, session_processes

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """A head and one worker node started with cluster/local/start.sh, stopped with stop.sh."""
    root = tmp_path_factory.mktemp("cluster")
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run([REPO / "cluster/local/start.sh", "--dir", root, "--workers", "1",
                    "--failure-detection-s", "3"],
                   env=env, check=True, timeout=120)
    cluster = LocalCluster.attach(root)
    sessions = [n.pid for n in cluster.info.nodes]
    try:
        yield cluster
    finally:
        subprocess.run([REPO / "cluster/local/stop.sh", "--dir", root], env=env, check=True, timeout=120)
        leftovers = [p for sid in sessions for p in session_processes(sid)]
        assert not leftovers, f"processes left after stop.sh: {leftovers}"

"""Autoscaling proven on one machine: a cluster with a 0-CPU head and no workers, whose autoscaler
(Ray's fake_multinode provider) may start up to two 2-CPU worker nodes. A sweep submitted as a
Ray job asks for more than the head has; the autoscaler must launch workers for it, every
experiment must finish on them, and the workers must be removed once idle."""

import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from tools.jobs import JobClient
from tools.local_cluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORKER_TYPES = {"cpu2": {"resources": {"CPU": 2, "object_store_memory": 200 * 2**20}, "max_workers": 2}}
IDLE_TIMEOUT_S = 30  # longer than a sweep's pauses between Tune trials and waves: no worker leaves mid-sweep

pytestmark = pytest.mark.ray


def worker_nodes(cluster: LocalCluster) -> list[dict]:
    return [n for n in cluster.alive_nodes() if not n["is_head_node"]]


@pytest.fixture
def autoscaling_cluster(tmp_path):
    with LocalCluster(
        tmp_path / "cluster", n_workers=0, head_cpus=0, autoscale=WORKER_TYPES, idle_timeout_s=IDLE_TIMEOUT_S
    ) as cluster:
        yield cluster
    # Stopping the head's session stops the nodes its autoscaler started, and nothing else.
    gcs = cluster.info.gcs_address
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if gcs in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, f"processes of the stopped cluster remain: {leftovers}"


def test_sweep_launches_workers_for_its_experiments_and_they_go_when_idle(autoscaling_cluster, tmp_path):
    cluster = autoscaling_cluster
    assert worker_nodes(cluster) == []
    peak, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(len(worker_nodes(cluster)))
            stop.wait(1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    jobs = JobClient(cluster.info.dashboard_url, cluster.info.token_file)
    out = tmp_path / "sweep"
    try:
        job_id = jobs.submit(
            [
                "python",
                "jobs/sweep.py",
                "--spec",
                "tests/cluster/autoscale_sweep.yaml",
                "--config",
                "tiny",
                "--out",
                str(out),
            ],
            working_dir=REPO,
            runtime_env_json=json.dumps({"env_vars": {"PYTHONPATH": "tests/cluster"}}),
        )
        assert jobs.wait(job_id, timeout_s=240) == "SUCCEEDED", jobs.logs(job_id)
    finally:
        stop.set()
        watcher.join()

    rows = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in rows] == ["succeeded"] * 3
    assert all(r["metrics"]["cpus"] == 2 for r in rows)
    head = next(n["node_id"] for n in cluster.alive_nodes() if n["is_head_node"])
    used = {r["node_id"] for r in rows}
    assert head not in used, "the 0-CPU head ran an experiment"
    assert 1 <= max(peak) <= WORKER_TYPES["cpu2"]["max_workers"]  # launched, within the bound

    finished = time.monotonic()
    deadline = finished + 60 + IDLE_TIMEOUT_S
    while worker_nodes(cluster):
        assert time.monotonic() < deadline, f"idle workers never removed: {worker_nodes(cluster)}"
        time.sleep(1)
    nodes = cluster.get_json("/api/v0/nodes?limit=1000&detail=true")["data"]["result"]["result"]
    dead = {n["node_id"] for n in nodes if n["state"] == "DEAD"}
    assert used <= dead, "the workers that ran the experiments are gone"
    print(
        f"sweep job {finished - started:.0f} s, idle workers removed after {time.monotonic() - finished:.0f} s, "
        f"peak {max(peak)} workers"
    )

"""A real local multi-node Ray cluster: token auth, `ray job submit --working-dir .`, node death."""

import json
import os
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tools.jobs import JobFailed
from tools.local_cluster import session_processes

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ray


def test_token_auth_is_on_and_token_stays_private(local_cluster):
    token = Path(local_cluster.info.token_file)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert REPO not in token.parents
    assert local_cluster.info.dashboard_url.startswith("http://127.0.0.1:")
    with pytest.raises(urllib.error.HTTPError) as denied:
        local_cluster.get_json("/api/v0/nodes", auth=False)
    assert denied.value.code == 401
    request = urllib.request.Request(
        local_cluster.info.dashboard_url + "/api/v0/nodes", headers={"Authorization": "Bearer " + "0" * 64}
    )
    with pytest.raises(urllib.error.HTTPError) as wrong:
        urllib.request.urlopen(request, timeout=10)
    assert wrong.value.code == 403
    nodes = local_cluster.alive_nodes()
    tags = sorted(t for n in nodes for t in n["resources_total"] if t.startswith("node_tag:"))
    assert tags == ["node_tag:head", "node_tag:worker1"]
    assert all(n["resources_total"]["CPU"] == 1 for n in nodes)


def test_job_submit_runs_a_task_on_every_node(local_cluster, jobs, tmp_path):
    out = tmp_path / "check"  # the "shared filesystem" every node of this machine sees
    job_id = jobs.submit(["python", "jobs/cluster_check.py", "--out", f"file://{out}"], working_dir=REPO)
    assert jobs.wait(job_id, timeout_s=120) == "SUCCEEDED"
    assert "report written to" in jobs.logs(job_id)

    report = json.loads((out / "cluster_check.json").read_text())
    assert report["unreachable"] == []
    assert len(report["nodes"]) == 2
    # Each probe ran inside the process tree of the node it was pinned to: its session is the
    # one that node's `ray start` leads.
    for node in report["nodes"]:
        (tag,) = [t for t in node["resources"] if t.startswith("node_tag:")]
        started = local_cluster.node(tag.removeprefix("node_tag:"))
        assert node["probe"]["node_id"] == node["node_id"]
        assert node["probe"]["session_id"] == started.pid
        # The job's code is the uploaded working dir, unpacked on that node, not an installed copy.
        assert node["probe"]["reclora_ray"].startswith(started.temp_dir)
        assert "working_dir_files" in node["probe"]["reclora_ray"]
    assert report["cluster_resources"]["CPU"] == 2


def test_failing_job_raises_with_its_logs(jobs):
    job_id = jobs.submit(["python", "jobs/cluster_check.py"], working_dir=REPO)  # --out missing
    with pytest.raises(JobFailed, match="the following arguments are required: --out"):
        jobs.wait(job_id, timeout_s=60)
    assert jobs.status(job_id) == "FAILED"


def test_kill_node_is_a_node_death(local_cluster):
    node = local_cluster.add_worker("worker2")
    assert session_processes(node.pid), "the new node has no processes"
    local_cluster.kill_node("worker2")
    assert session_processes(node.pid) == []
    deadline = time.monotonic() + 60
    while any("node_tag:worker2" in n["resources_total"] for n in local_cluster.alive_nodes()):
        assert time.monotonic() < deadline, "the head never noticed the node death"
        time.sleep(1)
    assert [n.name for n in local_cluster.info.nodes] == ["head", "worker1"]
    assert os.path.exists(node.log_file)


def test_sweep_job_spreads_experiments_over_the_nodes(jobs, tmp_path):
    job_id = jobs.submit(
        [
            "python",
            "jobs/sweep.py",
            "--config",
            "tiny",
            "--out",
            str(tmp_path),
            "--experiment",
            "sweep_experiments:slow_fit",
            "--grid",
            "crm.lr=0.1,0.3",
            "--no-share-upstream",
        ],
        working_dir=REPO,
        runtime_env_json=json.dumps({"env_vars": {"PYTHONPATH": "tests/cluster"}}),
    )
    assert jobs.wait(job_id, timeout_s=120) == "SUCCEEDED"
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["status"] for r in rows] == ["succeeded", "succeeded"]
    # One CPU per node and one CPU per experiment: they ran side by side on the two nodes.
    assert len({r["node_id"] for r in rows}) == 2

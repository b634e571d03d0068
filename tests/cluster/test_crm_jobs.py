"""CRM pretraining submitted to the local multi-node cluster with `ray job submit --working-dir .`:
outputs at a URI, and a worker node killed mid-training."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from reclora_ray.cli import main as cli_main
from reclora_ray.crm import load_crm
from reclora_ray.rundir import MARKER

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ray

# Short epochs: 20 steps of 256 rows, then the valid split (10K rows).
FAST_CRM = ["--set", "crm.history=recent", "--set", "crm.batch_size=256", "--set", "crm.steps_per_epoch=20"]


def registered_checkpoint(scratch: Path) -> bool:
    """Whether the Ray Train controller has registered a checkpoint (a checkpoint directory on
    disk is not enough: a report the controller has not collected yet is lost with its worker)."""
    for snapshot in scratch.glob("*/crm/.ray-train-sim-recent/*/checkpoint_manager_snapshot.json"):
        try:
            return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
        except json.JSONDecodeError:  # being written
            return False
    return False


def train_worker_nodes(cluster, ray_job_id: str) -> dict[str, str]:
    """{actor id: node name} of the Ray Train workers of one Ray job, alive or dead."""
    names = {
        n["node_id"]: tag.removeprefix("node_tag:")
        for n in cluster.get_json("/api/v0/nodes?limit=1000&detail=true")["data"]["result"]["result"]
        for tag in n["resources_total"]
        if tag.startswith("node_tag:")
    }
    actors = cluster.get_json("/api/v0/actors?limit=10000&detail=true")["data"]["result"]["result"]
    return {
        a["actor_id"]: names[a["node_id"]]
        for a in actors
        if a["class_name"] == "RayTrainWorker" and a["job_id"] == ray_job_id and a.get("node_id")
    }


def test_crm_job_survives_a_worker_node_death_and_uploads_its_checkpoint(local_cluster, jobs, tiny_data, tmp_path):
    """`ray job submit --working-dir . -- python jobs/pretrain_crm.py --config tiny --out URI`:
    the run directory is staged in RECLORA_SCRATCH (here a local dir every node of this machine
    sees, as a shared volume on a real cluster); the node running the trainer is killed after the
    first checkpoint; the run resumes from it on the surviving nodes and uploads its outputs."""
    # Two 2-CPU nodes besides the 1-CPU head and worker1: the trainer (2 workers x 1 CPU) packs
    # onto one of them; the Ray Data read tasks use the rest.
    for name in ("big1", "big2"):
        local_cluster.add_worker(name, num_cpus=2)
    try:
        run, scratch = tmp_path / "run", tmp_path / "scratch"
        shutil.copytree(tiny_data, run / "data")
        scratch.mkdir()
        uri = f"file://{run}"  # the upload path s3:// and gs:// outputs take
        args = [
            "--config",
            "tiny",
            "--out",
            uri,
            *FAST_CRM,
            "--set",
            "crm.epochs=2",
            "--set",
            "crm.patience=10",
            "--set",
            "crm.num_workers=2",
            "--set",
            "crm.cpus_per_worker=1",
            "--set",
            "crm.max_failures=1",
        ]
        job_id = jobs.submit(
            ["python", "jobs/pretrain_crm.py", *args],
            working_dir=REPO,
            runtime_env_json=json.dumps({"env_vars": {"RECLORA_SCRATCH": str(scratch)}}),
        )
        deadline = time.monotonic() + 240
        while not registered_checkpoint(scratch):
            assert jobs.status(job_id) in ("PENDING", "RUNNING"), jobs.logs(job_id)
            assert time.monotonic() < deadline, jobs.logs(job_id)
            time.sleep(0.5)
        ray_job_id = jobs.sdk.get_job_info(job_id).job_id
        first = train_worker_nodes(local_cluster, ray_job_id)
        (victim,) = set(first.values()) & {"big1", "big2"}
        local_cluster.kill_node(victim)
        assert jobs.wait(job_id, timeout_s=240) == "SUCCEEDED"

        logs = jobs.logs(job_id)
        assert re.search(r"resuming at epoch 1 \(restart 1\)", logs), logs  # from the checkpoint, not from scratch
        later = {node for actor, node in train_worker_nodes(local_cluster, ray_job_id).items() if actor not in first}
        assert later and victim not in later
    finally:
        for name in ("big1", "big2"):
            if any(n.name == name for n in local_cluster.info.nodes):
                local_cluster.remove_node(name)

    out = run / "crm" / "sim-recent"  # crm.history=recent: the recent-history checkpoint
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER,
        "config.yaml",
        "crm.json",
        "curves.jsonl",
        "metrics.json",
        "model.safetensors",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["restarts"] == 1 and metrics["epochs_run"] == 2
    assert metrics["model"] == "sim" and metrics["n_test"] == 200 and 0.5 < metrics["auc"] <= 1
    assert load_crm(out).d_c == metrics["d_c"] == json.loads((out / "crm.json").read_text())["d_c"]
    assert "uploading " in logs and list(scratch.iterdir()) == []  # the staged run directory is gone
    assert not (run / "crm" / ".ray-train-sim-recent").exists()

    # Same config again: the finished output at the URI is seen, nothing is trained or uploaded.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert cli_main(["pretrain-crm", *args]) == 0
    # Another config for the same output is refused, as for a local --out; the URI keeps the old one.
    assert cli_main(["pretrain-crm", *args, "--set", "crm.lr=0.1"]) == 2
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

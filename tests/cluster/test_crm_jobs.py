"""CRM pretraining submitted to the local multi-node cluster with `ray job submit --working-dir .`:
outputs at a URI, and a worker node killed mid-training."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from reclora_ray.cluster.entry import run_stage
from reclora_ray.crm import load_crm
from reclora_ray.rundir import MARKER

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.ray

# Short epochs: 20 steps of 256 rows, then the valid split (10K rows).
FAST_CRM = ["--set", "crm.history=recent", "--set", "crm.batch_size=256", "--set", "crm.steps_per_epoch=20"]


def run_dir_with(data: Path, root: Path) -> Path:
    shutil.copytree(data, root / "data")
    return root


def crm_job(out: str, *extra: str) -> list[str]:
    return ["python", "jobs/pretrain_crm.py", "--config", "tiny", "--out", out, *FAST_CRM, *extra]


def test_pretrain_crm_job_writes_its_checkpoint_to_a_uri(jobs, tiny_data, tmp_path):
    run = run_dir_with(tiny_data, tmp_path / "run")
    uri = f"file://{run}"  # the upload path s3:// and gs:// outputs take
    job_id = jobs.submit(crm_job(uri), working_dir=REPO)
    assert jobs.wait(job_id, timeout_s=240) == "SUCCEEDED"
    logs = jobs.logs(job_id)
    assert "RayTrainWorker" in logs and "uploading " in logs

    out = run / "crm" / "sim"
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.yaml", "crm.json", "metrics.json",
                                                      "model.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "sim" and metrics["restarts"] == 0 and metrics["epochs_run"] == 1
    assert metrics["n_test"] == 200 and 0.5 < metrics["auc"] <= 1
    assert load_crm(out).d_c == metrics["d_c"] == json.loads((out / "crm.json").read_text())["d_c"]
    assert not (run / "crm" / ".ray-train-sim").exists()  # Ray Train scratch stayed in the job's scratch

    # Same config again: the finished output at the URI is seen, nothing is trained or uploaded.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert run_stage("pretrain-crm", ["--config", "tiny", "--out", uri, *FAST_CRM], inputs=["data"]) == 0
    # Another config for the same output is refused, as for a local --out; the URI keeps the old one.
    assert run_stage("pretrain-crm", ["--config", "tiny", "--out", uri, *FAST_CRM, "--set", "crm.lr=0.1"],
                     inputs=["data"]) == 2
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def registered_checkpoint(storage: Path) -> bool:
    """Whether the Ray Train controller has registered a checkpoint (a checkpoint directory on
    disk is not enough: a report the controller has not collected yet is lost with its worker)."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
        except json.JSONDecodeError:  # being written
            return False
    return False


def train_worker_nodes(cluster, ray_job_id: str) -> dict[str, str]:
    """{actor id: node name} of the Ray Train workers of one Ray job, alive or dead."""
    names = {n["node_id"]: tag.removeprefix("node_tag:")
             for n in cluster.get_json("/api/v0/nodes?limit=1000&detail=true")["data"]["result"]["result"]
             for tag in n["resources_total"] if tag.startswith("node_tag:")}
    actors = cluster.get_json("/api/v0/actors?limit=10000&detail=true")["data"]["result"]["result"]
    return {a["actor_id"]: names[a["node_id"]] for a in actors
            if a["class_name"] == "RayTrainWorker" and a["job_id"] == ray_job_id and a.get("node_id")}


def test_crm_training_survives_a_worker_node_death(local_cluster, jobs, tiny_data, tmp_path):
    # Two 2-CPU nodes besides the 1-CPU head and worker1: the trainer (2 workers x 1 CPU) packs
    # onto one of them; the Ray Data read tasks use the rest.
    for name in ("big1", "big2"):
        local_cluster.add_worker(name, num_cpus=2)
    try:
        run = run_dir_with(tiny_data, tmp_path / "run")
        job_id = jobs.submit(crm_job(str(run), "--set", "crm.epochs=3", "--set", "crm.patience=10",
                                     "--set", "crm.num_workers=2", "--set", "crm.cpus_per_worker=1",
                                     "--set", "crm.max_failures=1"), working_dir=REPO)
        deadline = time.monotonic() + 180
        while not registered_checkpoint(run / "crm" / ".ray-train-sim"):
            assert jobs.status(job_id) in ("PENDING", "RUNNING"), jobs.logs(job_id)
            assert time.monotonic() < deadline, jobs.logs(job_id)
            time.sleep(0.5)
        ray_job_id = jobs.sdk.get_job_info(job_id).job_id
        first = train_worker_nodes(local_cluster, ray_job_id)
        (victim,) = set(first.values()) & {"big1", "big2"}
        local_cluster.kill_node(victim)
        assert jobs.wait(job_id, timeout_s=240) == "SUCCEEDED"

        metrics = json.loads((run / "crm" / "sim" / "metrics.json").read_text())
        assert metrics["restarts"] == 1 and metrics["epochs_run"] == 3
        assert (run / "crm" / "sim" / "model.safetensors").is_file()
        resumed = [int(e) for e in re.findall(r"resuming at epoch (\d+) \(restart 1\)", jobs.logs(job_id))]
        assert resumed and resumed[0] >= 1  # from the checkpoint, not from scratch
        later = {actor: node for actor, node in train_worker_nodes(local_cluster, ray_job_id).items()
                 if actor not in first}
        assert later and set(later.values()) <= {"head", "worker1", "big1", "big2"} - {victim}
    finally:
        for name in ("big1", "big2"):
            if any(n.name == name for n in local_cluster.info.nodes):
                local_cluster.remove_node(name)

"""The AWS launcher and KubeRay configs: valid for Ray's own schema, consistent with each other,
with pyproject.toml and with the packaged GPU configs, and keeping the token and dashboard private.

What cannot be checked without a cloud: that the AMI, instance types and images exist, that
`ray up` / the KubeRay operator accept the files end to end, and that torch's CUDA build runs
on a V100. Those are stated in the configs' comments and the README.
"""

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import torch
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

from reclora_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"

# vCPUs and V100s of the AWS instance types the launcher may use (EC2 instance type specs).
INSTANCE_SPECS = {
    "m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0),
    "p3.2xlarge": (8, 1), "p3.8xlarge": (32, 4), "p3.16xlarge": (64, 8),
}
GPU_CONFIGS = ("ml-1m", "ml-25m", "goodreads")


def load(path: str):
    return yaml.safe_load((CLUSTER / path).read_text())


def pyproject_requirements() -> dict[str, Requirement]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in meta["dependencies"]}


def pinned(text: str, package: str) -> str:
    (version,) = set(re.findall(rf'"{package}==([0-9][^"]*)"', text))
    return version


@pytest.fixture(scope="module")
def launcher():
    return load("aws/reclora.yaml")


@pytest.fixture(scope="module")
def raycluster():
    return load("kuberay/raycluster.yaml")


# ------------------------------------------------------------------ AWS cluster launcher


def test_launcher_passes_rays_schema_and_config_preparation(launcher):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    prepared = prepare_config(launcher)  # what `ray up` does before anything touches AWS
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_launcher_node_types_match_their_instances(launcher):
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0}  # the head runs no tasks
    workers = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    for name, spec in workers.items():
        cpus, gpus = INSTANCE_SPECS[spec["node_config"]["InstanceType"]]
        assert spec["resources"] == ({"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}), name
        assert 0 == spec["min_workers"] < spec["max_workers"], f"{name} must scale from zero"
    gpu_types = [t for t in workers.values() if t["resources"].get("GPU")]
    cpu_types = [t for t in workers.values() if not t["resources"].get("GPU")]
    assert gpu_types and cpu_types
    assert all(t["node_config"]["InstanceType"].startswith("p3.") for t in gpu_types)  # V100
    assert sum(t["max_workers"] for t in workers.values()) <= launcher["max_workers"]


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_packaged_gpu_configs_fit_the_v100_cluster(launcher, name):
    cfg = load_config(name)
    assert cfg.llm.dtype != "bfloat16", "V100s have no bf16"
    workers = [t for k, t in launcher["available_node_types"].items() if k != launcher["head_node_type"]]
    max_gpus_per_node = max(t["resources"].get("GPU", 0) for t in workers)
    total_gpus = sum(t["resources"].get("GPU", 0) * t["max_workers"] for t in workers)
    gpu_workers = [n for n, on in ((cfg.tune.num_workers, cfg.tune.use_gpu), (cfg.crm.num_workers, cfg.crm.use_gpu)) if on]
    assert all(n <= total_gpus for n in gpu_workers)
    assert cfg.tune.num_workers <= max_gpus_per_node  # DeepSpeed tuning fits on one NVLink node
    assert cfg.embed.num_gpus <= max_gpus_per_node and cfg.score.num_gpus <= max_gpus_per_node


def test_launcher_installs_the_pyproject_versions(launcher):
    reqs = pyproject_requirements()
    image = launcher["docker"]["image"]
    ray_version, python_tag = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d+)-gpu", image).groups()
    assert ray_version == ray.__version__, "cluster and submitting client must run the same Ray"
    assert Version(ray_version) in reqs["ray"].specifier
    assert python_tag == "311"
    for spec in launcher["available_node_types"].values():
        worker_image = spec.get("docker", {}).get("worker_image")
        assert worker_image in (None, image.replace("-gpu", "-cpu"))
    setup = "\n".join(launcher["setup_commands"])
    torch_pin = pinned(setup, "torch")
    assert Version(torch_pin) in reqs["torch"].specifier
    assert torch_pin == torch.__version__.split("+")[0]
    assert "pip install -q -e /home/ray/reclora-ray" in setup
    assert launcher["file_mounts"]["/home/ray/reclora-ray"] == "."  # configs travel with the code


def test_launcher_keeps_token_and_dashboard_private(launcher):
    head = " ".join(launcher["head_start_ray_commands"])
    worker = " ".join(launcher["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "export RAY_AUTH_MODE=token;" in head and "export RAY_AUTH_MODE=token;" in worker
    token_mount = launcher["file_mounts"]["/home/ray/.ray/auth_token"]
    assert token_mount.startswith("~/"), "the token comes from the user's machine, not the repo"
    assert "RAY_AUTH_TOKEN=" not in head + worker


def test_no_token_is_committed_under_cluster():
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"\b[0-9a-f]{32,}\b", text), f"{path} holds something token-like"
            assert "RAY_AUTH_TOKEN=" not in text.replace("export RAY_AUTH_TOKEN=", ""), path


# ------------------------------------------------------------------ KubeRay


def test_raycluster_autoscales_with_token_auth_and_private_dashboard(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    spec = raycluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]
    ]
    for container in containers:
        for env in container.get("env", []):
            assert env["name"] != "RAY_AUTH_TOKEN" or "valueFrom" in env, "token must come from a Secret"


def test_raycluster_groups_mirror_the_launcher_node_types(raycluster, launcher):
    node_types = launcher["available_node_types"]
    head = raycluster["spec"]["headGroupSpec"]
    assert float(head["rayStartParams"]["num-cpus"]) == node_types[launcher["head_node_type"]]["resources"]["CPU"]
    groups = {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == set(node_types) - {launcher["head_node_type"]}
    for name, group in groups.items():
        resources = node_types[name]["resources"]
        params = group["rayStartParams"]
        assert int(params["num-cpus"]) == resources["CPU"], name
        assert int(params.get("num-gpus", 0)) == resources.get("GPU", 0), name
        assert (group["minReplicas"], group["maxReplicas"]) == (
            node_types[name]["min_workers"], node_types[name]["max_workers"]), name
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) == resources.get("GPU", 0), name
        assert float(limits["cpu"]) <= resources["CPU"], name


def test_kuberay_image_is_the_dockerfile_build_of_this_version(raycluster, launcher):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    spec = raycluster["spec"]
    images = {spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]} | {
        g["template"]["spec"]["containers"][0]["image"] for g in spec["workerGroupSpecs"]
    }
    assert images == {f"reclora-ray:{version}"}
    dockerfile = (CLUSTER / "kuberay/Dockerfile").read_text()
    assert f"FROM {launcher['docker']['image']}\n" in dockerfile
    assert pinned(dockerfile, "torch") == pinned("\n".join(launcher["setup_commands"]), "torch")


def test_rayjob_runs_crm_pretraining_on_the_cluster(raycluster):
    job = load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}
    argv = job["spec"]["entrypoint"].split()
    assert argv[:2] == ["python", "/home/ray/reclora-ray/jobs/pretrain_crm.py"]
    options = dict(zip(argv[2::2], argv[3::2]))
    assert load_config(options["--config"]).crm.use_gpu
    assert re.match(r"^(s3|gs)://", options["--out"]), "a RayJob's outputs must outlive its pods"
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    images = {c["image"] for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert images == {raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}


def test_every_pod_mounts_the_shared_runs_volume_the_rayjob_stages_in(raycluster):
    claim = load("kuberay/runs-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = raycluster["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    mounts = set()
    for pod in pods:
        (volume,) = [v["name"] for v in pod["volumes"]
                     if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
        mounts |= {m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume}
    (mount,) = mounts  # the same path on every node
    env = yaml.safe_load(load("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])["env_vars"]
    assert Path(env["RECLORA_SCRATCH"]).is_relative_to(mount)

"""The AWS launcher and KubeRay configs: valid for Ray's own schema, consistent with each other,
with constraints.txt (the versions every install uses) and pyproject.toml, installing the torch
build that runs on each node type's GPU, and keeping the token and dashboard private.

What cannot be checked without a cloud: that the AMI, instance types and images exist, that
`ray up` / the KubeRay operator accept the files end to end, and that the CUDA builds run on the
GPUs (reclora_ray.gpu checks that on every GPU worker at start-up). KubeRay's CRD schemas are
checked in test_kuberay_schemas.py.
"""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from reclora_ray import __version__
from reclora_ray.config import load_config
from reclora_ray.gpu import CUDA_LINES
from reclora_ray.serve.app import build_app

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CONSTRAINTS = "/home/ray/reclora-ray/constraints.txt"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# vCPUs, GPUs and GPU model of the AWS instance types the launcher may use (EC2 instance specs).
INSTANCE_SPECS = {
    "m5.2xlarge": (8, 0, None),
    "m5.4xlarge": (16, 0, None),
    "p3.2xlarge": (8, 1, "V100"),
    "p3.8xlarge": (32, 4, "V100"),
    "p3.16xlarge": (64, 8, "V100"),
    "g6e.2xlarge": (8, 1, "L40S"),
    "p4d.24xlarge": (96, 8, "A100"),
    "p5.48xlarge": (192, 8, "H100"),
}
# The GPU behind each nvidia.com/gpu.product label the KubeRay groups select.
GPU_PRODUCTS = {
    "Tesla-V100-SXM2-16GB": "V100",
    "NVIDIA-L40S": "L40S",
    "NVIDIA-A100-SXM4-40GB": "A100",
    "NVIDIA-H100-80GB-HBM3": "H100",
}
GPU_CONFIGS = ("ml-1m", "ml-1m-1gpu", "ml-25m", "goodreads")


def load(path: str):
    return yaml.safe_load((CLUSTER / path).read_text())


def pyproject_requirements() -> dict[str, Requirement]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in meta["dependencies"]}


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


def line_of(gpu: str):
    (line,) = [line for line in CUDA_LINES.values() if gpu in line.gpus]
    return line


def torch_index(commands: list[str]) -> str:
    """The --index-url of the one torch install among `commands`, which must use the constraints."""
    (install,) = [c for c in commands if re.search(r"pip install .* torch ", c + " ")]
    assert f"-c {CONSTRAINTS}" in install, install
    return re.search(r"--index-url (\S+)", install).group(1)


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
        cpus, gpus, _ = INSTANCE_SPECS[spec["node_config"]["InstanceType"]]
        assert spec["resources"] == ({"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}), name
        assert 0 == spec["min_workers"] < spec["max_workers"], f"{name} must scale from zero"
    gpus = {INSTANCE_SPECS[t["node_config"]["InstanceType"]][2] for t in workers.values()} - {None}
    assert gpus == {"V100", "A100", "H100", "L40S"}
    assert any(not t["resources"].get("GPU") for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= launcher["max_workers"]


def test_every_node_type_installs_the_torch_build_for_its_gpu(launcher):
    """V100s from the CUDA 12.6 index (the CUDA 13 default has no sm_70), newer GPUs from cu130,
    the head and CPU workers from the CPU index; nothing installs torch from anywhere else."""
    assert launcher["setup_commands"] == [] and launcher["worker_setup_commands"] == []
    assert torch_index(launcher["head_setup_commands"]) == CPU_INDEX
    for name, spec in launcher["available_node_types"].items():
        if name == launcher["head_node_type"]:
            continue
        gpu = INSTANCE_SPECS[spec["node_config"]["InstanceType"]][2]
        commands = spec["worker_setup_commands"]
        assert torch_index(commands) == (line_of(gpu).index_url if gpu else CPU_INDEX), name
        assert commands[-1] == f"pip install -q -c {CONSTRAINTS} -e /home/ray/reclora-ray", name
    assert line_of("V100").tag == "cu126"


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_packaged_gpu_configs_fit_the_v100_cluster(launcher, name):
    cfg = load_config(name)
    assert cfg.llm.dtype != "bfloat16", "V100s have no bf16"
    workers = [
        t
        for t in launcher["available_node_types"].values()
        if INSTANCE_SPECS[t["node_config"]["InstanceType"]][2] == "V100"
    ]
    max_gpus_per_node = max(t["resources"].get("GPU", 0) for t in workers)
    total_gpus = sum(t["resources"].get("GPU", 0) * t["max_workers"] for t in workers)
    gpu_workers = [
        n for n, on in ((cfg.tune.num_workers, cfg.tune.use_gpu), (cfg.crm.num_workers, cfg.crm.use_gpu)) if on
    ]
    assert all(n <= total_gpus for n in gpu_workers)
    assert cfg.tune.num_workers <= max_gpus_per_node  # DeepSpeed tuning fits on one NVLink node
    assert cfg.embed.num_gpus <= max_gpus_per_node and cfg.score.num_gpus <= max_gpus_per_node


def test_single_gpu_config_runs_every_stage_on_one_gpu_node(launcher):
    cfg = load_config("ml-1m-1gpu")
    paper = load_config("ml-1m")
    assert cfg.tune.use_gpu and cfg.crm.use_gpu and cfg.tune.gradient_checkpointing
    assert cfg.tune.num_workers == cfg.crm.num_workers == 1
    assert cfg.embed.num_gpus * cfg.embed.concurrency == cfg.score.num_gpus * cfg.score.concurrency == 1
    assert cfg.serve.num_gpus == 1
    global_batch = lambda c: c.tune.micro_batch * c.tune.grad_accum * c.tune.num_workers  # noqa: E731
    assert global_batch(cfg) == global_batch(paper) and cfg.llm == paper.llm and cfg.data == paper.data
    one_gpu = [k for k, t in launcher["available_node_types"].items() if t["resources"].get("GPU") == 1]
    assert {INSTANCE_SPECS[launcher["available_node_types"][k]["node_config"]["InstanceType"]][2] for k in one_gpu} == {
        "V100",
        "L40S",
    }


def test_constraints_pin_what_pyproject_allows():
    pins, reqs = constraints(), pyproject_requirements()
    assert reqs["ray"].specifier.contains("2.52.0")
    assert not reqs["ray"].specifier.contains("2.51.0"), "token auth needs Ray >= 2.52"
    for name, req in reqs.items():
        assert name in pins, f"{name} is a dependency but not in constraints.txt"
        assert Version(pins[name]) in req.specifier, f"constraints.txt {name}=={pins[name]} outside {req}"


def test_every_install_uses_the_constraints_file(launcher):
    makefile = (REPO / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert all("-c constraints.txt" in line or "--no-deps" in line for line in installs), installs
    assert "$(VENV)/.installed: pyproject.toml constraints.txt" in makefile
    dockerfile = (CLUSTER / "kuberay/Dockerfile").read_text()
    runs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert len(runs) == 2 and all("-c constraints.txt" in line for line in runs), runs
    assert "COPY --chown=ray:users constraints.txt ./" in dockerfile
    assert launcher["file_mounts"]["/home/ray/reclora-ray"] == "."  # constraints and configs travel with the code


def test_cluster_ray_and_python_are_the_pinned_ones(launcher, raycluster):
    ray_pin = constraints()["ray"]
    image = launcher["docker"]["image"]
    ray_version, python_tag = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d+)-gpu", image).groups()
    assert ray_version == ray_pin, "cluster and submitting client must run the same Ray"
    assert python_tag == "311"
    for spec in launcher["available_node_types"].values():
        worker_image = spec.get("docker", {}).get("worker_image")
        assert worker_image in (None, image.replace("-gpu", "-cpu"))
    assert f"FROM {image}\n" in (CLUSTER / "kuberay/Dockerfile").read_text()
    for name in ("raycluster.yaml", "rayservice.yaml"):
        spec = load(f"kuberay/{name}")["spec"]
        assert spec.get("rayClusterConfig", spec)["rayVersion"] == ray_pin, name


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
            node_types[name]["min_workers"],
            node_types[name]["max_workers"],
        ), name
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) == resources.get("GPU", 0), name
        product = group["template"]["spec"].get("nodeSelector", {}).get("nvidia.com/gpu.product")
        assert GPU_PRODUCTS.get(product) == INSTANCE_SPECS[node_types[name]["node_config"]["InstanceType"]][2], name
        assert float(limits["cpu"]) <= resources["CPU"], name


def test_kuberay_images_are_the_dockerfile_builds_for_each_gpu(raycluster):
    """Each pod runs reclora-ray:<version>-<line>, the line being the one for its group's GPU."""
    dockerfile = (CLUSTER / "kuberay/Dockerfile").read_text()
    assert "--index-url https://download.pytorch.org/whl/${CUDA_LINE}" in dockerfile
    default = re.search(r"^ARG CUDA_LINE=(\S+)$", dockerfile, re.M).group(1)
    assert default in CUDA_LINES
    for line in CUDA_LINES.values():
        assert line.index_url == f"https://download.pytorch.org/whl/{line.tag}"
    for name in ("raycluster.yaml", "rayservice.yaml"):
        spec = load(f"kuberay/{name}")["spec"]
        spec = spec.get("rayClusterConfig", spec)
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["image"] == f"reclora-ray:{__version__}-{default}", name
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            product = pod.get("nodeSelector", {}).get("nvidia.com/gpu.product")
            tag = line_of(GPU_PRODUCTS[product]).tag if product else default
            assert pod["containers"][0]["image"] == f"reclora-ray:{__version__}-{tag}", (name, group["groupName"])
            assert bool(product) == ("num-gpus" in group["rayStartParams"]), (name, group["groupName"])


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "/runs"} <= ignored
    for entry in (REPO / ".gitignore").read_text().split():
        assert entry.rstrip("/") in {i.rstrip("/") for i in ignored} | {"__pycache__"}, entry


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


def kuberay_pods():
    """(manifest, group, pod spec) of every pod template of the RayCluster and the RayService."""
    for name in ("raycluster.yaml", "rayservice.yaml"):
        spec = load(f"kuberay/{name}")["spec"]
        spec = spec.get("rayClusterConfig", spec)
        yield name, "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield name, group["groupName"], group["template"]["spec"]


def test_every_pod_mounts_the_shared_runs_volume_with_the_model_cache_on_it():
    claim = load("kuberay/runs-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = set()
    for name, group, pod in kuberay_pods():
        (volume,) = [
            v["name"]
            for v in pod["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
        ]
        (container,) = pod["containers"]
        (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
        mounts.add(mount)
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert Path(env["HF_HOME"]).is_relative_to(mount), (name, group)  # one 7B download per cluster
    (mount,) = mounts  # the same path on every node
    env = yaml.safe_load(load("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])["env_vars"]
    assert Path(env["RECLORA_SCRATCH"]).is_relative_to(mount)


def test_rayservice_deploys_the_serve_app_on_a_run_of_the_shared_volume(raycluster):
    service = load("kuberay/rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = ServeDeploySchema(**yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "reclora_ray.serve.app:build_app"
    args = dict(app.args)
    with pytest.raises(Exception, match="prepared dataset"):  # the args are build_app's own
        build_app({**args, "run": "/nonexistent/run"})
    cfg = load_config(args["config"], [o for o in args["overrides"].split(";") if o])
    mount = {
        m["mountPath"]
        for _, _, pod in kuberay_pods()
        for m in pod["containers"][0]["volumeMounts"]
        if m["name"] == "runs"
    }
    assert any(Path(args["run"]).is_relative_to(m) for m in mount)
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == raycluster["spec"]["authOptions"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if "num-gpus" in g["rayStartParams"]]
    assert cfg.serve.num_gpus > 0 and gpu_groups
    assert cfg.serve.max_replicas * cfg.serve.num_gpus <= sum(
        int(g["rayStartParams"]["num-gpus"]) * g["maxReplicas"] for g in gpu_groups
    )
    assert cfg.llm.dtype != "bfloat16" or all(  # the V100 group has no bf16
        "V100" not in g["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] for g in gpu_groups
    )

"""The GPU start-up check, with torch.cuda's device capability and arch list faked (no GPU here)."""

import pytest
import torch

from reclora_ray import gpu
from reclora_ray.base_model import load_base
from reclora_ray.config import load_config

CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # CUDA 13 build: no Volta
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(capability, arch_list, name="Tesla V100-SXM2-16GB"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return install


@pytest.mark.parametrize(
    "arch_list, capability, ok",
    [
        (CU130, (7, 0), False),  # V100 on the default CUDA 13 wheel: the failure this check exists for
        (CU126, (7, 0), True),
        (CU130, (8, 0), True),
        (CU130, (9, 0), True),
        (CU130, (8, 9), True),  # L40S: sm_86 cubins run on 8.9
        (["sm_80"], (9, 0), False),  # cubins do not cross a major version
        (["sm_80", "compute_80"], (9, 0), True),  # PTX is JIT-compiled for newer GPUs
        (["sm_90a"], (9, 0), True),
        (["sm_90a"], (10, 0), False),
        ([], (8, 0), False),  # a CPU-only torch on a GPU node
    ],
)
def test_supports(arch_list, capability, ok):
    assert gpu.supports(arch_list, capability) is ok


def test_v100_on_a_cuda13_torch_fails_naming_the_cu126_image_and_index(fake_gpu):
    fake_gpu((7, 0), CU130)
    with pytest.raises(gpu.GPUArchMismatch) as err:
        gpu.check_device("cuda:0")
    message = str(err.value)
    assert "Tesla V100-SXM2-16GB is sm_70" in message
    assert "-cu126 image" in message and "https://download.pytorch.org/whl/cu126" in message


def test_matching_builds_and_cpu_devices_pass(fake_gpu):
    fake_gpu((7, 0), CU126)
    gpu.check_device("cuda:0")
    fake_gpu((9, 0), CU130, name="NVIDIA H100 80GB HBM3")
    gpu.check_device()
    fake_gpu((7, 0), CU130)
    gpu.check_device("cpu")  # a CPU worker on a GPU node never launches a kernel


def test_every_node_type_gpu_has_a_line_that_runs_on_it():
    capabilities = {"V100": (7, 0), "A100": (8, 0), "L40S": (8, 9), "H100": (9, 0)}
    for line in gpu.CUDA_LINES.values():
        for name in line.gpus:
            assert gpu.line_for(capabilities[name]) is line, name
            assert line.min_capability <= capabilities[name]
    with pytest.raises(gpu.GPUArchMismatch, match="sm_35"):
        gpu.line_for((3, 5))


def test_model_loading_runs_the_check_before_touching_the_gpu(fake_gpu):
    fake_gpu((7, 0), CU130)
    cfg = load_config("tiny")
    with pytest.raises(gpu.GPUArchMismatch, match="cu126"):
        load_base(cfg.llm, "cuda:0")

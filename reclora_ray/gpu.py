"""Which torch build runs on which GPU, and the start-up check every GPU worker makes.

torch wheels carry compiled kernels for a fixed list of GPU architectures; a wheel without the
device's architecture imports fine and fails at the first kernel launch ("no kernel image is
available for execution on the device"). The CUDA 13 builds on PyPI dropped Volta (sm_70), so
V100 nodes need the CUDA 12.6 build. CUDA_LINES is the one place that says which build (wheel
index and image tag) each node type installs; the cluster files and their tests follow it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CudaLine:
    tag: str  # image tag suffix: reclora-ray:<version>-<tag>
    index_url: str  # pip --index-url for torch
    min_capability: tuple[int, int]  # oldest GPU architecture the line's torch wheels carry
    gpus: tuple[str, ...]  # the node types' GPUs it is meant for


CUDA_LINES = {
    "cu126": CudaLine("cu126", "https://download.pytorch.org/whl/cu126", (5, 0), ("V100",)),
    "cu130": CudaLine("cu130", "https://download.pytorch.org/whl/cu130", (7, 5), ("A100", "H100", "L40S")),
}


class GPUArchMismatch(RuntimeError):
    """The installed torch has no kernels for this GPU."""


def line_for(capability: tuple[int, int]) -> CudaLine:
    """The newest CUDA line whose wheels still run on a GPU of this compute capability."""
    fitting = [line for line in CUDA_LINES.values() if line.min_capability <= capability]
    if not fitting:
        raise GPUArchMismatch(f"no CUDA line in reclora_ray.gpu.CUDA_LINES supports sm_{capability[0]}{capability[1]}")
    return max(fitting, key=lambda line: line.min_capability)


def supports(arch_list: list[str], capability: tuple[int, int]) -> bool:
    """True when a torch built for `arch_list` (torch.cuda.get_arch_list()) runs on `capability`.

    An sm_XY cubin runs on X.Y and later minors of the same major; compute_XY (PTX) is compiled
    by the driver for any device of capability >= X.Y.
    """
    for arch in arch_list:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)a?", arch)
        if not match:
            continue
        kind, major, minor = match.group(1), int(match.group(2)), int(match.group(3))
        if arch.endswith("a") and (major, minor) != capability:
            continue  # arch-specific cubins (sm_90a) run on exactly that architecture
        if kind == "sm" and major == capability[0] and minor <= capability[1]:
            return True
        if kind == "compute" and (major, minor) <= capability:
            return True
    return False


def check_device(device=None) -> None:
    """Fail at once, naming the image and wheel index to use, when torch cannot run on `device`.

    Called where a worker puts a model on its GPU (base_model.load_base, CRM training), before any
    kernel runs; a CPU device passes.
    """
    import torch

    if device is not None and torch.device(device).type != "cuda":
        return
    if not torch.cuda.is_available():
        return
    capability = tuple(torch.cuda.get_device_capability(device))
    arch_list = torch.cuda.get_arch_list()
    if supports(arch_list, capability):
        return
    name = torch.cuda.get_device_name(device)
    line = line_for(capability)
    raise GPUArchMismatch(
        f"{name} is sm_{capability[0]}{capability[1]}, but this torch {torch.__version__} carries "
        f"kernels for {', '.join(arch_list) or 'no GPU'} only: run this node on the "
        f"reclora-ray:<version>-{line.tag} image, or install torch with "
        f"`pip install torch --index-url {line.index_url} -c constraints.txt` (docs/cluster.md)"
    )

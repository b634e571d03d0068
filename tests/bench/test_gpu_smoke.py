"""bench/gpu_smoke.sh stays runnable without a GPU to run it on: its config overrides are valid
for its configs, and every flag it passes to a bench script is one that script takes."""

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from reclora_ray.config import load_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = (REPO / "bench" / "gpu_smoke.sh").read_text()
MODES = SCRIPT.split("\nelse\n", 1)  # the --dry-run settings, then the GPU ones


def arrays(text: str) -> dict[str, list[str]]:
    found = {}
    for name, body in re.findall(r"^\s*(SETS|PLORA|SCORE)=\((.*?)\)\s*$", text, re.M | re.S):
        found[name] = shlex.split(body.replace("\\\n", " "))
    return found


@pytest.mark.parametrize("mode", [0, 1], ids=["dry-run", "gpu"])
def test_pipeline_overrides_are_valid_config_keys(mode):
    config = re.search(r"CONFIG=(\w+)", MODES[mode]).group(1)
    sets = arrays(MODES[mode])["SETS"]
    overrides = [sets[i + 1] for i in range(0, len(sets), 2)]
    assert sets[::2] == ["--set"] * len(overrides)
    cfg = load_config(config, [*overrides, "llm.dtype=float16"])
    if mode == 1:
        assert cfg.tune.use_gpu and cfg.tune.num_workers == 1 and cfg.score.num_gpus == 1


@functools.lru_cache(maxsize=None)
def usage(script: str) -> str:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize("mode", [0, 1], ids=["dry-run", "gpu"])
@pytest.mark.parametrize("name, script", [("PLORA", "plora_overhead.py"), ("SCORE", "score_throughput.py")])
def test_bench_flags_exist(mode, name, script):
    for flag in (a for a in arrays(MODES[mode])[name] if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", usage(script)), f"{script} takes no {flag}"


def test_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_smoke.sh")], check=True)

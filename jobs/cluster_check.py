"""Check a Ray cluster before running the pipeline on it: every node runs this project's code.

One task is pinned to each alive node (hard node affinity); it imports reclora_ray, torch and ray
from the job's runtime environment and reports where it ran. The report goes to OUT (a local or
shared path, or any pyarrow URI such as s3://bucket/checks/1) as cluster_check.json:

    ray job submit --working-dir . -- python jobs/cluster_check.py --out s3://bucket/checks/1
    python jobs/cluster_check.py --out /tmp/check        # a local Ray, for comparison

It fails (exit 1) when a node cannot run a task within --timeout seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401  (this checkout's reclora_ray first on the path)
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from reclora_ray import storage

log = logging.getLogger("cluster_check")


@ray.remote(num_cpus=0)  # a probe, not work: it must also run on a busy node or a 0-CPU head
def probe() -> dict:
    import torch

    import reclora_ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "session_id": os.getsid(0),
        "python": sys.version.split()[0],
        "ray": ray.__version__,
        "torch": torch.__version__,
        "reclora_ray": str(Path(reclora_ray.__file__).parent),
        "gpus": ray.get_gpu_ids(),
        "cuda_available": torch.cuda.is_available(),
    }


def check(timeout_s: float) -> dict:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    log.info("%d alive nodes; running one probe on each", len(nodes))
    refs = {
        n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in nodes
    }
    ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    by_ref = {ref: node_id for node_id, ref in refs.items()}
    probes = {by_ref[ref]: ray.get(ref) for ref in ready}
    return {
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cluster_resources": ray.cluster_resources(),
        "nodes": [
            {
                "node_id": n["NodeID"],
                "address": n["NodeManagerAddress"],
                "resources": n["Resources"],
                "is_head": "node:__internal_head__" in n["Resources"],
                "probe": probes.get(n["NodeID"]),
            }
            for n in nodes
        ],
        "unreachable": [by_ref[ref] for ref in pending],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory (local path or URI) for cluster_check.json")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the probes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    ray.init()  # inside `ray job submit`, RAY_ADDRESS points at the cluster
    report = check(args.timeout)
    storage.write_text(storage.join(args.out, "cluster_check.json"), json.dumps(report, indent=2))
    for node in report["nodes"]:
        p = node["probe"]
        log.info(
            "%s %s %s",
            node["node_id"][:12],
            node["address"],
            f"ok: torch {p['torch']}, ray {p['ray']}, GPUs {p['gpus']}" if p else "NO RESPONSE",
        )
    log.info("report written to %s", storage.join(args.out, "cluster_check.json"))
    return 1 if report["unreachable"] else 0


if __name__ == "__main__":
    sys.exit(main())

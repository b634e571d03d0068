"""Time `reclora retrieve` on the synthetic ML-25M-scale log and measure its peak memory.

    python bench/retrieve_scale.py                  # 25,000,095 samples, K_long 60, K_short 10
    python bench/retrieve_scale.py --rows 2000000   # users and items scaled down with the rows

The log comes from `reclora synth` and is prepared once into --work-dir with the packaged ml-25m
config, but with every test sample kept (no 70,000 subsample), so every one of the log's
behaviours is a sample. Item embeddings are random unit vectors of the configured dimension
(embed.pca_dim, 512 for ml-25m): retrieval's cost does not depend on what they mean. Then
retrieve runs with semantic long and short lists on a local Ray of --num-cpus cores. Memory is
sampled (bench/memory.py) over the driver and all its child processes (Ray workers, raylet, GCS):
peak_rss_gb sums their RSS (shared object-store pages count once per process that maps them,
so it overstates), peak_pss_gb their proportional set sizes. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import PeakMemory  # noqa: E402  (bench/ is on sys.path when run as a script)

from reclora_ray.config import load_config  # noqa: E402
from reclora_ray.console import setup_logging  # noqa: E402
from reclora_ray.rundir import RunDir  # noqa: E402

FULL_USERS, FULL_ITEMS, FULL_ROWS = 162_541, 59_047, 25_000_095


def prepared_log(work: Path, rows: int, num_cpus: int) -> Path:
    """OUT for the synthetic log, prepared once (synth + prepare are the data stages' code)."""
    scale = rows / FULL_ROWS
    users, items = max(1, round(FULL_USERS * scale)), max(1, round(FULL_ITEMS * scale))
    out = work / f"synth-{users}u-{items}i-{rows}r"
    if not (out / "data" / "meta.json").is_file():
        from reclora_ray.data.prepare import prepare_dataset
        from reclora_ray.data.synth import write_synthetic_ml25m

        raw = out / "raw"
        if not (raw / "movies.csv").is_file():
            write_synthetic_ml25m(raw, users, items, rows)
        cfg = load_config("ml-25m", [f"data.raw_dir={raw}", f"run.num_cpus={num_cpus}", "data.test_subsample=null"])
        prepare_dataset(cfg, RunDir(out).data, overwrite=True)
        import ray

        ray.shutdown()
    return out


def write_random_embeddings(run: RunDir, n_items: int, dim: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run.embeddings.mkdir(parents=True, exist_ok=True)
    vectors = np.random.default_rng(0).standard_normal((n_items, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array(np.arange(n_items), pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim).cast(
                    pa.list_(pa.float32())
                ),
            }
        ),
        run.embeddings / "item_embeddings.parquet",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=FULL_ROWS)
    parser.add_argument("--work-dir", default="/tmp/reclora-bench-retrieve")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the retrieve run, e.g. retrieve.batch_size=65536",
    )
    args = parser.parse_args()
    setup_logging()

    import pyarrow.parquet as pq

    from reclora_ray.retrieval.retrieve import retrieve_histories

    run = RunDir(prepared_log(Path(args.work_dir), args.rows, args.num_cpus))
    cfg = load_config(
        "ml-25m",
        [
            f"run.num_cpus={args.num_cpus}",
            f"retrieve.concurrency={args.num_cpus}",
            "retrieve.k_long=60",
            "retrieve.k_short=10",
            *args.overrides,
        ],
    )
    meta = json.loads((run.data / "meta.json").read_text())
    n_items = pq.read_metadata(run.data / "items.parquet").num_rows
    write_random_embeddings(run, n_items, cfg.embed.pca_dim)

    with PeakMemory() as sampler:
        started = time.perf_counter()
        out = retrieve_histories(cfg, run.root, overwrite=True)
        wall_s = time.perf_counter() - started
    stats = json.loads((out / "retrieval.json").read_text())["splits"]
    samples = sum(s["samples"] for s in stats.values())
    print(
        json.dumps(
            {
                "bench": "retrieve_scale",
                "samples": samples,
                "splits": {name: s["samples"] for name, s in stats.items()},
                "users": meta.get("n_users"),
                "items": n_items,
                "k_long": cfg.retrieve.k_long,
                "k_short": cfg.retrieve.k_short,
                "dim": cfg.embed.pca_dim,
                "mean_long": round(stats["train"]["mean_long"], 2),
                "mean_short": round(stats["train"]["mean_short"], 2),
                "wall_s": round(wall_s, 1),
                "samples_per_s": round(samples / wall_s),
                "peak_rss_gb": round(sampler.peak_rss / 2**30, 2),
                "peak_pss_gb": round(sampler.peak_pss / 2**30, 2),
                "num_cpus": args.num_cpus,
                "batch_size": cfg.retrieve.batch_size,
                "load_avg_1m": os.getloadavg()[0],
                "machine_cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()

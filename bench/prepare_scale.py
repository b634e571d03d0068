"""Time `reclora prepare` on a synthetic ML-25M-scale log and measure its peak memory.

    python bench/prepare_scale.py                 # 162,541 users, 59,047 items, 25,000,095 rows
    python bench/prepare_scale.py --rows 2000000  # users and items scaled down with the rows

The synthetic log is written once into --work-dir (its time is reported apart as synth_s);
then prepare runs with the packaged ml-25m config (k_core 0, label rating > 3.0, test
subsample 70,000) on a local Ray of --num-cpus cores. Memory is sampled (bench/memory.py) over the
driver and all its child processes (the Ray workers, raylet, GCS): peak_rss_gb sums their RSS
(shared object-store pages count once per process that maps them, so it overstates),
peak_pss_gb sums their proportional set sizes (shared pages split between processes).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import PeakMemory  # noqa: E402  (bench/ is on sys.path when run as a script)

from reclora_ray.config import load_config  # noqa: E402
from reclora_ray.console import setup_logging  # noqa: E402
from reclora_ray.data.prepare import prepare_dataset  # noqa: E402
from reclora_ray.data.synth import write_synthetic_ml25m  # noqa: E402

FULL_USERS, FULL_ITEMS, FULL_ROWS = 162_541, 59_047, 25_000_095


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=FULL_ROWS)
    parser.add_argument("--work-dir", default="/tmp/reclora-bench-prepare")
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()
    setup_logging()

    scale = args.rows / FULL_ROWS
    users, items = max(1, round(FULL_USERS * scale)), max(1, round(FULL_ITEMS * scale))
    work = Path(args.work_dir)
    raw = work / f"synth-{users}u-{items}i-{args.rows}r"
    synth_s = 0.0
    if not (raw / "movies.csv").is_file():
        started = time.perf_counter()
        write_synthetic_ml25m(raw, users, items, args.rows)
        synth_s = time.perf_counter() - started

    cfg = load_config("ml-25m", [f"data.raw_dir={raw}", f"run.num_cpus={args.num_cpus}"])
    with PeakMemory() as sampler:
        started = time.perf_counter()
        out = prepare_dataset(cfg, work / "run" / "data", overwrite=True)
        wall_s = time.perf_counter() - started
    meta = json.loads((out / "meta.json").read_text())
    import ray

    ray.shutdown()
    print(
        json.dumps(
            {
                "bench": "prepare_scale",
                "rows": meta["n_rows"],
                "users": meta["n_users"],
                "items": meta["n_items"],
                "samples": {s: meta["splits"][s]["rows"] for s in meta["splits"]},
                "wall_s": round(wall_s, 1),
                "rows_per_s": round(meta["n_rows"] / wall_s),
                "peak_rss_gb": round(sampler.peak_rss / 2**30, 2),
                "peak_pss_gb": round(sampler.peak_pss / 2**30, 2),
                "synth_s": round(synth_s, 1),
                "num_cpus": args.num_cpus,
                "load_avg_1m": os.getloadavg()[0],
                "machine_cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()

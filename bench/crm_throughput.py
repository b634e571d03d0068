"""CRM training throughput: samples/s per model through the real Ray Train + Ray Data path, and
the peak memory of the whole process tree (driver + local Ray), on ML-100K and on a synthetic
log at ML-25M scale.

    python bench/crm_throughput.py --work /tmp/crm-bench                 # both datasets, every model
    python bench/crm_throughput.py --datasets ml-100k --models sim din --steps 100

Each model trains one epoch capped at --steps steps (crm.steps_per_epoch) with 2 CPU workers and
the recent history (K = 60; the synthetic log has no retrieval); samples/s is the steady-state
training rate the workers report (pipeline warm-up excluded). The synthetic log is written here as
a contract-conforming prepared dataset (reclora_ray/data/prepared.py): 162,541 users, 59,047
items, 25,000,095 behaviours with ML-25M-like heavy-tailed activity and popularity; only its
valid/test splits are cut to the last 50,000 behaviours each so validation stays cheap.
Last line: {"models": {"<dataset>/<model>": {"samples_per_s": ...}}, "peak_rss_gb": ...}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from memory import PeakMemory  # bench/ is on sys.path when run as a script

from reclora_ray.config import load_config
from reclora_ray.crm.models import MODELS
from reclora_ray.crm.train import pretrain_crm

log = logging.getLogger("crm_throughput")

ML25M = {"users": 162_541, "items": 59_047, "rows": 25_000_095}
SMALL_SPLIT = 50_000


def write_synthetic_ml25m(root: Path, fraction: float, seed: int = 0) -> Path:
    """A prepared dataset at ML-25M scale (times `fraction`) under root/data."""
    data = root / "data"
    if (data / "meta.json").is_file():
        return data
    rng = np.random.default_rng(seed)
    n_users = max(100, int(ML25M["users"] * fraction))
    n_items = max(100, int(ML25M["items"] * fraction**0.5))
    n_rows = int(ML25M["rows"] * fraction)
    log.info("writing a synthetic log: %d users, %d items, %d behaviours", n_users, n_items, n_rows)
    (data / "samples").mkdir(parents=True, exist_ok=True)

    activity = rng.pareto(1.2, n_users) + 1  # heavy-tailed: a few users rate thousands of movies
    lengths = np.maximum(20, np.floor(activity / activity.sum() * n_rows)).astype(np.int64)
    lengths[np.argmax(lengths)] += n_rows - lengths.sum()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.9
    item_ids = rng.choice(n_items, size=n_rows, p=popularity / popularity.sum()).astype(np.int32)
    item_quality = rng.normal(size=n_items).astype(np.float32)
    user_of_row = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    user_bias = rng.normal(scale=0.7, size=n_users).astype(np.float32)
    ratings = np.clip(
        np.round((3.5 + item_quality[item_ids] * 0.6 + user_bias[user_of_row] + rng.normal(scale=0.8, size=n_rows)) * 2)
        / 2,
        0.5,
        5.0,
    ).astype(np.float32)
    labels = (ratings > 3.0).astype(np.int8)
    gaps = np.cumsum(rng.integers(1, 3600, size=n_rows))
    first = rng.integers(789_652_009, 1_500_000_000, size=n_users)
    timestamps = np.repeat(first, lengths) + gaps - np.repeat(gaps[offsets[:-1]], lengths)
    pos = np.arange(n_rows, dtype=np.int64) - offsets[user_of_row]

    def lists(values):
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    pq.write_table(
        pa.table(
            {
                "user_id": np.arange(n_users),
                "item_ids": lists(item_ids),
                "ratings": lists(ratings),
                "labels": lists(labels),
                "timestamps": lists(timestamps),
            }
        ),
        data / "sequences.parquet",
    )
    order = np.argsort(timestamps, kind="stable")  # global time order = sample_id order
    sample_id = np.empty(n_rows, dtype=np.int64)
    sample_id[order] = np.arange(n_rows)
    bounds = [0, n_rows - 2 * SMALL_SPLIT, n_rows - SMALL_SPLIT, n_rows]
    for split, a, b in zip(("train", "valid", "test"), bounds, bounds[1:]):
        rows = order[a:b]
        pq.write_table(
            pa.table(
                {
                    "sample_id": sample_id[rows],
                    "user_id": user_of_row[rows],
                    "item_id": item_ids[rows].astype(np.int64),
                    "label": labels[rows],
                    "rating": ratings[rows],
                    "timestamp": timestamps[rows],
                    "pos": pos[rows],
                }
            ),
            data / "samples" / f"{split}.parquet",
            row_group_size=1 << 20,
        )
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Documentary"]
    pd.DataFrame(
        {
            "item_id": np.arange(n_items),
            "raw_id": np.arange(n_items) + 1,
            "title": [f"Movie {i}" for i in range(n_items)],
            "year": pd.array(1950 + np.arange(n_items) % 70, dtype="Int64"),
            "genres": [[genres[i % 8], genres[(i // 8) % 8]] for i in range(n_items)],
            "text": [f"Movie {i}" for i in range(n_items)],
        }
    ).to_parquet(data / "items.parquet", index=False)
    pd.DataFrame(
        {"user_id": np.arange(n_users), "raw_id": np.arange(n_users) + 1, "profile_text": [""] * n_users}
    ).to_parquet(data / "users.parquet", index=False)
    (data / "meta.json").write_text(json.dumps({"dataset": "ml-25m", "synthetic": True, "n_rows": n_rows}))
    return data


def prepared_ml100k(root: Path) -> None:
    if (root / "data" / "meta.json").is_file():
        return
    from reclora_ray.data.prepare import prepare_dataset

    prepare_dataset(load_config("quickstart"), root / "data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/crm-bench", help="where the datasets and checkpoints go")
    parser.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-25m"], choices=["ml-100k", "ml-25m"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=150, help="training steps per model")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of ML-25M size for the synthetic log")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    work = Path(args.work)

    results: dict[str, dict] = {}
    with PeakMemory() as memory:
        for dataset in args.datasets:
            run = work / dataset
            if dataset == "ml-100k":
                prepared_ml100k(run)
            else:
                write_synthetic_ml25m(run, args.scale)
            for model in args.models:
                # ML-25M has no user profile: its users are ids (as in the ml-25m config).
                users = [] if dataset == "ml-100k" else ["crm.user_fields=null", "crm.user_id=true"]
                cfg = load_config(
                    "quickstart",
                    [
                        f"data.dataset={dataset}",
                        f"crm.model={model}",
                        "crm.history=recent",
                        "crm.epochs=1",
                        f"crm.steps_per_epoch={args.steps}",
                        "crm.batch_size=1024",
                        "run.num_cpus=2",
                        *users,
                    ],
                )
                started = time.perf_counter()
                out = pretrain_crm(cfg, run, overwrite=True)
                metrics = json.loads((out / "metrics.json").read_text())
                epoch = metrics["history"][0]
                results[f"{dataset}/{model}"] = {
                    "samples_per_s": round(epoch["train_samples_per_s"], 1),
                    "steps": args.steps,
                    "wall_s": round(time.perf_counter() - started, 1),
                    "test_auc": round(metrics["auc"], 4),
                }
                log.info("%s/%s: %s", dataset, model, results[f"{dataset}/{model}"])
    print(
        json.dumps(
            {"models": results, "peak_rss_gb": round(memory.peak_rss / 2**30, 2), "cpus": os.cpu_count(), "workers": 2}
        )
    )


if __name__ == "__main__":
    main()

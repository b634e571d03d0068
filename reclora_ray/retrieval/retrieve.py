"""`reclora retrieve`: the long and short history of every sample (paper section 3.4).

For each sample, among the user's earlier behaviours (`sequences[user][:pos]`), the top
`retrieve.k_long` (ID modality, for the CRM) and top `retrieve.k_short` (text modality, for the
LLM prompt) by cosine similarity to the target item, kept in chronological order
(`reclora_ray.retrieval.history`). `retrieve.long_mode` / `short_mode: recent` take the last K
instead (the paper's "w/o retriever" ablations); with both recent no embeddings are needed and
the same columns are still written.

Each split is read and processed as a Ray Data stream: `map_batches` over an actor pool whose
actors share the CSR sequences and the embeddings through the object store (zero-copy), batches
of `retrieve.batch_size` samples, order preserved, and the driver appends the results to one
parquet file per split, so memory stays bounded at ML-25M scale and the work spreads over a
cluster's CPUs.

Output (OUT/data/retrieval/{train,valid,test}.parquet): sample_id, hist_long list<int32>,
hist_short list<int32>, in the row order of OUT/data/samples/{split}.parquet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reclora_ray.config import Config
from reclora_ray.data.prepared import SPLITS, PreparedData
from reclora_ray.retrieval.embed import load_item_embeddings
from reclora_ray.retrieval.history import HistoryRetriever, lists_to_padded, padded_to_lists
from reclora_ray.rundir import RunDir, check_can_write, read_marker, staged_output, write_json_atomic
from reclora_ray.runtime import config_from_args, init_ray, save_resolved_config

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("sample_id", pa.int64()), ("hist_long", pa.list_(pa.int32())),
                    ("hist_short", pa.list_(pa.int32()))])
INPUT_COLUMNS = ["sample_id", "user_id", "item_id", "pos"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from reclora_ray.cli import add_common_arguments

    add_common_arguments(parser)


def main(args: argparse.Namespace) -> int:
    retrieve_histories(config_from_args(args), args.out, overwrite=args.overwrite)
    return 0


def uses_embeddings(cfg: Config) -> bool:
    return "semantic" in (cfg.retrieve.long_mode, cfg.retrieve.short_mode)


def fingerprint(cfg: Config, run: RunDir) -> str:
    payload = {"data": asdict(cfg.data), "retrieve": asdict(cfg.retrieve)}
    if uses_embeddings(cfg):
        payload["embeddings"] = (read_marker(run.embeddings) or {}).get("fingerprint")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def retrieve_histories(cfg: Config, out: str | Path, overwrite: bool = False) -> Path:
    run = RunDir(out)
    fp = fingerprint(cfg, run)
    if not check_can_write(run.retrieval, fp, overwrite):
        return run.retrieval
    data = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
    embeddings = (load_item_embeddings(run.embeddings, data.n_items, dim=cfg.embed.pca_dim)
                  if uses_embeddings(cfg) else None)
    init_ray(cfg)
    import ray

    shared = {
        "offsets": ray.put(data.sequences.offsets),
        "seq_items": ray.put(data.sequences.item_ids),
        "embeddings": ray.put(embeddings),
    }
    r = cfg.retrieve
    log.info("retrieving: long %s k=%d, short %s k=%d", r.long_mode, r.k_long, r.short_mode, r.k_short)
    stats = {}
    with staged_output(run.retrieval, fp) as tmp:
        for split in SPLITS:
            stats[split] = _retrieve_split(cfg, data.split_path(split), tmp / f"{split}.parquet", shared)
        write_json_atomic(tmp / "retrieval.json", {"k_long": r.k_long, "k_short": r.k_short,
                                                   "long_mode": r.long_mode, "short_mode": r.short_mode,
                                                   "splits": stats})
        save_resolved_config(cfg, tmp)
    return run.retrieval


def _retrieve_split(cfg: Config, samples_path: Path, out_path: Path, shared: dict) -> dict:
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    samples = pq.read_table(samples_path, columns=INPUT_COLUMNS)
    expected_ids = samples.column("sample_id").to_numpy()
    # Blocks come from the driver rather than read tasks, so the actors may hold every CPU.
    size = cfg.retrieve.batch_size
    ds = ray.data.from_arrow([samples.slice(i, size) for i in range(0, max(len(samples), 1), size)])
    del samples
    ds = ds.map_batches(
        RetrieveBatch, fn_constructor_kwargs={"shared": shared, "cfg": cfg.retrieve},
        batch_size=cfg.retrieve.batch_size, batch_format="numpy",
        concurrency=cfg.retrieve.concurrency, num_cpus=1,
    )
    started, done = time.time(), 0
    long_total = short_total = 0
    with pq.ParquetWriter(out_path, SCHEMA) as writer:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            ids = table.column("sample_id").to_numpy()
            if not np.array_equal(ids, expected_ids[done:done + len(ids)]):
                raise RuntimeError(f"{samples_path}: retrieval results came back out of order at row {done}")
            writer.write_table(table.select(SCHEMA.names).cast(SCHEMA))
            done += len(ids)
            long_total += _total_length(table.column("hist_long"))
            short_total += _total_length(table.column("hist_short"))
            rate = done / max(time.time() - started, 1e-9)
            log.info("%s: %d/%d samples (%.0f/s)", out_path.stem, done, len(expected_ids), rate)
    if done != len(expected_ids):
        raise RuntimeError(f"{samples_path}: {len(expected_ids)} samples but {done} retrieval rows")
    return {"samples": done, "mean_long": long_total / max(done, 1), "mean_short": short_total / max(done, 1),
            "seconds": round(time.time() - started, 1)}


def _total_length(column: pa.ChunkedArray) -> int:
    return int(sum(len(chunk.flatten()) for chunk in column.chunks))


class RetrieveBatch:
    """A Ray Data actor holding the shared sequences and embeddings (zero-copy from the store)."""

    def __init__(self, shared: dict, cfg):
        import ray

        self.retriever = HistoryRetriever(
            offsets=ray.get(shared["offsets"]), seq_items=ray.get(shared["seq_items"]),
            embeddings=ray.get(shared["embeddings"]), k_long=cfg.k_long, k_short=cfg.k_short,
            long_mode=cfg.long_mode, short_mode=cfg.short_mode,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        hist_long, hist_short = self.retriever.retrieve(batch["user_id"], batch["item_id"], batch["pos"])
        return pa.table({"sample_id": pa.array(batch["sample_id"].astype(np.int64)),
                         "hist_long": padded_to_lists(hist_long), "hist_short": padded_to_lists(hist_short)})


@dataclass
class Retrieval:
    """One split's retrieved histories: indices into each user's sequence, -1 padded on the
    left like `Sequences.recent`, so `sequences.gather(user_ids, hist_long)` gives item ids."""

    sample_id: np.ndarray  # int64 (n,), the row order of samples/{split}.parquet
    hist_long: np.ndarray  # int32 (n, k_long)
    hist_short: np.ndarray  # int32 (n, k_short)


def retrieval_dir(path: str | Path) -> Path:
    """OUT, OUT/data or OUT/data/retrieval -> OUT/data/retrieval."""
    path = Path(path)
    for candidate in (path, path / "retrieval", RunDir(path).retrieval):
        if (candidate / "retrieval.json").is_file():
            return candidate
    raise FileNotFoundError(f"no retrieval output under {path}; run `reclora retrieve` first")


def load_retrieval(path: str | Path, split: str) -> Retrieval:
    """The `split`'s retrieved histories from a run directory, its data dir or the retrieval dir."""
    directory = retrieval_dir(path)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    meta = json.loads((directory / "retrieval.json").read_text())
    table = pq.read_table(directory / f"{split}.parquet")
    return Retrieval(
        sample_id=table.column("sample_id").to_numpy(),
        hist_long=lists_to_padded(table.column("hist_long"), meta["k_long"]),
        hist_short=lists_to_padded(table.column("hist_short"), meta["k_short"]),
    )

"""`reclora retrieve`: the long and short history of every sample (paper section 3.4).

For each sample, among the user's earlier behaviours (`sequences[user][:pos]`), the top
`retrieve.k_long` (ID modality, for the CRM) and top `retrieve.k_short` (text modality, for the
LLM prompt) by cosine similarity to the target item, kept in chronological order
(`reclora_ray.retrieval.history`). `retrieve.long_mode` / `short_mode: recent` take the last K
instead (the paper's "w/o retriever" ablations); with both recent no embeddings are needed and
the same columns are still written.

Each split is processed in user order, so every sample of a user is scored against that user's
history in a few large matrix products: Ray Data `map_batches` over an actor pool whose actors
share the CSR sequences and the embeddings through the object store (zero-copy), blocks of
`retrieve.batch_size` samples. The driver spills each result block to a scratch file and then
writes the split in its own row order, a window of rows at a time, so memory stays bounded at
ML-25M scale and the work spreads over a cluster's CPUs.

Output (OUT/retrieval/{train,valid,test}.parquet): sample_id, hist_long list<int32>,
hist_short list<int32>, in the row order of OUT/data/samples/{split}.parquet.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reclora_ray.config import Config
from reclora_ray.console import Progress
from reclora_ray.data.prepared import SPLITS, PreparedData
from reclora_ray.retrieval.embed import load_item_embeddings
from reclora_ray.retrieval.history import HistoryRetriever, lists_to_padded, padded_to_lists
from reclora_ray.rundir import RunDir, write_json_atomic
from reclora_ray.runtime import init_ray
from reclora_ray.stages import StageRun

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [("sample_id", pa.int64()), ("hist_long", pa.list_(pa.int32())), ("hist_short", pa.list_(pa.int32()))]
)
INPUT_COLUMNS = ["sample_id", "user_id", "item_id", "pos"]


def run_stage(cfg: Config, run: RunDir, key=None, overwrite: bool = False) -> Path:
    return retrieve_histories(cfg, run, overwrite)


def retrieve_histories(cfg: Config, out: str | Path | RunDir, overwrite: bool = False) -> Path:
    """OUT/retrieval from OUT/data (and OUT/embeddings); a no-op when it is already there."""
    stage = StageRun("retrieve", cfg, out)
    run = stage.run
    if stage.up_to_date(overwrite):
        return run.retrieval
    data = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
    embeddings = (
        load_item_embeddings(run.embeddings, data.n_items, dim=cfg.embed.pca_dim)
        if cfg.retrieve.uses_embeddings
        else None
    )
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
    with stage.write() as tmp:
        for split in SPLITS:
            stats[split] = _retrieve_split(cfg, data.split_path(split), tmp / f"{split}.parquet", shared)
        write_json_atomic(
            tmp / "retrieval.json",
            {
                "k_long": r.k_long,
                "k_short": r.k_short,
                "long_mode": r.long_mode,
                "short_mode": r.short_mode,
                "splits": stats,
            },
        )
    return run.retrieval


def user_block_bounds(user_ids: np.ndarray, size: int) -> np.ndarray:
    """Block boundaries over rows sorted by user: about `size` rows each (so every actor of the
    pool gets a share of a split), cut only where a user starts, so a block always holds every
    sample of its users."""
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]]) if len(user_ids) else np.zeros(0, int)
    at = np.searchsorted(starts, np.arange(size, len(user_ids), size))
    inner = np.unique(starts[at[at < len(starts)]])
    return np.r_[0, inner[inner > 0], len(user_ids)]


def _retrieve_split(cfg: Config, samples_path: Path, out_path: Path, shared: dict) -> dict:
    """Retrieve in user order, spill each result block to scratch files, then write the split
    in its own row order, one window of rows at a time."""
    import ray

    samples = pq.read_table(samples_path, columns=INPUT_COLUMNS)
    sample_ids = samples.column("sample_id").to_numpy()
    # Grouping every sample of a user into one block lets a heavy user's history be scored
    # against many targets per matrix product, instead of a few per time window.
    order = np.lexsort((samples.column("pos").to_numpy(), samples.column("user_id").to_numpy()))
    by_user = samples.drop_columns(["sample_id"]).take(order).append_column("row", pa.array(order))
    del samples
    size = min(cfg.retrieve.batch_size, -(-len(by_user) // cfg.retrieve.concurrency) or 1)
    cuts = user_block_bounds(by_user.column("user_id").to_numpy(), size)
    ds = ray.data.from_arrow([by_user.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])])
    del by_user
    ds = ds.map_batches(
        RetrieveBatch,
        fn_constructor_kwargs={"shared": shared, "cfg": cfg.retrieve},
        batch_size=None,
        batch_format="numpy",
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.retrieve.concurrency),
    )
    started, done = time.time(), 0
    progress = Progress(log, f"{out_path.stem}: retrieving", total=len(sample_ids), unit="samples")
    scratch = out_path.parent / f".{out_path.stem}-blocks"
    scratch.mkdir()
    blocks = []
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            path = scratch / f"{len(blocks)}"
            np.save(f"{path}-long.npy", batch["hist_long"])
            np.save(f"{path}-short.npy", batch["hist_short"])
            blocks.append((batch["row"], path))
            done += len(batch["row"])
            progress.update(len(batch["row"]))
        progress.close()
        if done != len(sample_ids):
            raise RuntimeError(f"{samples_path}: {len(sample_ids)} samples but {done} retrieval rows")
        stats = _write_in_row_order(out_path, sample_ids, blocks, cfg.retrieve)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stats["seconds"] = round(time.time() - started, 1)
    return stats


def _write_in_row_order(out_path: Path, sample_ids: np.ndarray, blocks: list, r) -> dict:
    """Each block's rows are ascending, so a window of rows is one slice of every block."""
    window = max(r.batch_size, 1 << 20)
    total_long = total_short = 0
    with pq.ParquetWriter(out_path, SCHEMA) as writer:
        for lo in range(0, len(sample_ids), window):
            hi = min(lo + window, len(sample_ids))
            hist_long = np.empty((hi - lo, r.k_long), dtype=np.int32)
            hist_short = np.empty((hi - lo, r.k_short), dtype=np.int32)
            for rows, path in blocks:
                a, b = np.searchsorted(rows, [lo, hi])
                if a < b:
                    hist_long[rows[a:b] - lo] = np.load(f"{path}-long.npy", mmap_mode="r")[a:b]
                    hist_short[rows[a:b] - lo] = np.load(f"{path}-short.npy", mmap_mode="r")[a:b]
            total_long += int((hist_long >= 0).sum())
            total_short += int((hist_short >= 0).sum())
            writer.write_table(
                pa.table(
                    {
                        "sample_id": pa.array(sample_ids[lo:hi], pa.int64()),
                        "hist_long": padded_to_lists(hist_long),
                        "hist_short": padded_to_lists(hist_short),
                    },
                    schema=SCHEMA,
                )
            )
    n = max(len(sample_ids), 1)
    return {"samples": len(sample_ids), "mean_long": total_long / n, "mean_short": total_short / n}


class RetrieveBatch:
    """A Ray Data actor holding the shared sequences and embeddings (zero-copy from the store)."""

    def __init__(self, shared: dict, cfg):
        import ray

        self.retriever = HistoryRetriever(
            offsets=ray.get(shared["offsets"]),
            seq_items=ray.get(shared["seq_items"]),
            embeddings=ray.get(shared["embeddings"]),
            k_long=cfg.k_long,
            k_short=cfg.k_short,
            long_mode=cfg.long_mode,
            short_mode=cfg.short_mode,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hist_long, hist_short = self.retriever.retrieve(batch["user_id"], batch["item_id"], batch["pos"])
        ascending = np.argsort(batch["row"])
        return {"row": batch["row"][ascending], "hist_long": hist_long[ascending], "hist_short": hist_short[ascending]}


@dataclass
class Retrieval:
    """One split's retrieved histories: indices into each user's sequence, -1 padded on the
    left like `Sequences.recent`, so `sequences.gather(user_ids, hist_long)` gives item ids."""

    sample_id: np.ndarray  # int64 (n,), the row order of samples/{split}.parquet
    hist_long: np.ndarray  # int32 (n, k_long)
    hist_short: np.ndarray  # int32 (n, k_short)


def retrieval_dir(run: RunDir | str | Path) -> Path:
    """OUT/retrieval of a run directory (a directory written before retrieval was a top-level
    output is moved there first)."""
    run = RunDir.of(run)
    run.upgrade()
    if not (run.retrieval / "retrieval.json").is_file():
        raise FileNotFoundError(f"no retrieval output in {run.retrieval}; run `reclora retrieve` first")
    return run.retrieval


def load_retrieval(run: RunDir | str | Path, split: str) -> Retrieval:
    """The `split`'s retrieved histories of a run directory."""
    directory = retrieval_dir(run)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    meta = json.loads((directory / "retrieval.json").read_text())
    table = pq.read_table(directory / f"{split}.parquet")
    return Retrieval(
        sample_id=table.column("sample_id").to_numpy(),
        hist_long=lists_to_padded(table.column("hist_long"), meta["k_long"]),
        hist_short=lists_to_padded(table.column("hist_short"), meta["k_short"]),
    )

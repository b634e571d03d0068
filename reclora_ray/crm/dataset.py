"""Sample rows -> encoded CRM batches, as a Ray Data stream (training) or a local loop (eval, represent).

A split is read in row ranges ("chunks"): one read task reads rows [start, stop) of
OUT/data/samples/{split}.parquet (and the same rows of OUT/retrieval/{split}.parquet for the long history),
gathers the history from the user sequences and encodes the batch. No task and no training
worker ever holds a whole split; the user sequences (CSR arrays) are shared through the object
store.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reclora_ray.crm.features import FeatureEncoder, FeatureSpec
from reclora_ray.data.prepared import PreparedData, PreparedDataError, Sequences
from reclora_ray.retrieval.history import history_indices
from reclora_ray.rundir import RunDir

log = logging.getLogger(__name__)

SAMPLE_READ_COLUMNS = ["sample_id", "user_id", "item_id", "label", "timestamp", "pos"]


def read_rows(path: Path, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of a parquet file, reading only the row groups that overlap them."""
    pf = pq.ParquetFile(path)
    groups, first_row, row = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row + n > start and row < stop:
            groups.append(g)
            first_row = row if first_row is None else first_row
        row += n
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - first_row, stop - start)


def num_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def retrieval_path(run: RunDir, split: str) -> Path:
    return run.retrieval / f"{split}.parquet"


def retrieved_history(run: RunDir, split: str, start: int, stop: int, expect_sample_ids: np.ndarray) -> pa.ChunkedArray:
    """hist_long of rows [start, stop) (retrieval contract: same row order as the samples file).

    The one place the CRM reads retrieval output; it reads row ranges so a split is never loaded
    whole (`reclora_ray.retrieval.retrieve.load_retrieval` returns whole splits).
    """
    path = retrieval_path(run, split)
    if not path.is_file():
        raise PreparedDataError(
            f"{path} is missing: crm.history is 'long', which needs the retrieved histories; "
            f"run `reclora retrieve` first (or set crm.history=recent)"
        )
    table = read_rows(path, start, stop, ["sample_id", "hist_long"])
    sample_ids = table.column("sample_id").to_numpy()
    if not np.array_equal(sample_ids, expect_sample_ids):
        bad = (
            int(np.flatnonzero(sample_ids != expect_sample_ids)[0]) if len(sample_ids) == len(expect_sample_ids) else 0
        )
        raise PreparedDataError(
            f"{path}: row {start + bad} has sample_id {sample_ids[bad] if len(sample_ids) else None}, "
            f"the samples file has {expect_sample_ids[bad]}; the retrieval output is stale, re-run `reclora retrieve`"
        )
    return table.column("hist_long")


def crm_history_indices(run: RunDir, split: str, spec: FeatureSpec, rows: pa.Table, start: int) -> np.ndarray:
    """(n, K) indices into each sample's user sequence: retrieved (long) or the most recent K."""
    retrieved = None
    if spec.history != "recent":
        stop = start + rows.num_rows
        retrieved = retrieved_history(run, split, start, stop, rows.column("sample_id").to_numpy())
    return history_indices(rows.column("pos").to_numpy(), spec.history_len, retrieved)


def encode_rows(
    run: RunDir, split: str, spec: FeatureSpec, sequences: Sequences, start: int, stop: int
) -> dict[str, np.ndarray]:
    """The encoded batch (plus label and sample_id) of rows [start, stop) of a split."""
    path = run.data / "samples" / f"{split}.parquet"
    rows = read_rows(path, start, stop, SAMPLE_READ_COLUMNS)
    indices = crm_history_indices(run, split, spec, rows, start)
    user_ids = rows.column("user_id").to_numpy()
    batch = FeatureEncoder(spec).encode(
        user_ids,
        rows.column("item_id").to_numpy(),
        rows.column("timestamp").to_numpy(),
        sequences.gather(user_ids, indices, "item_ids"),
        sequences.gather(user_ids, indices, "ratings"),
    )
    batch["label"] = rows.column("label").to_numpy().astype(np.float32)
    batch["sample_id"] = rows.column("sample_id").to_numpy().astype(np.int64)
    return batch


def chunk_ranges(n_rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_rows, n_rows)) for s in range(0, n_rows, chunk_rows)]


def iter_split(
    prepared: PreparedData, split: str, spec: FeatureSpec, chunk_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """Encoded chunks of a split in row order, in this process (no Ray)."""
    n = num_rows(prepared.split_path(split))
    for start, stop in chunk_ranges(n, chunk_rows):
        yield encode_rows(prepared.run, split, spec, prepared.sequences, start, stop)


def _encode_chunks(
    chunks: dict[str, np.ndarray], run: RunDir, split: str, spec: dict, sequences_ref
) -> dict[str, np.ndarray]:
    import ray

    sequences = ray.get(sequences_ref)  # zero-copy views of the object store
    parts = [
        encode_rows(run, split, FeatureSpec.from_dict(spec), sequences, int(a), int(b))
        for a, b in zip(chunks["start"], chunks["stop"])
    ]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def ray_dataset(
    prepared: PreparedData,
    split: str,
    spec: FeatureSpec,
    chunk_rows: int,
    sequences_ref,
    shuffle_chunks: bool,
    num_cpus: float = 1.0,
):
    """A Ray Data stream of encoded rows of a split; one read task per chunk of rows."""
    import ray

    n = num_rows(prepared.split_path(split))
    chunks = [{"start": a, "stop": b} for a, b in chunk_ranges(n, chunk_rows)]
    if not chunks:
        raise PreparedDataError(f"{prepared.split_path(split)} has no rows")
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    if shuffle_chunks:
        ds = ds.randomize_block_order()
    return ds.map_batches(
        _encode_chunks,
        batch_size=1,
        num_cpus=num_cpus,
        fn_kwargs={
            "run": prepared.run.resolved(),
            "split": split,
            "spec": spec.to_dict(),
            "sequences_ref": sequences_ref,
        },
    )

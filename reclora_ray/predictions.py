"""A scoring output's predictions: Parquet shards that Ray Data writes, and the readers of them.

A scoring stage streams its rows through the actor pool and writes them with Ray Data straight
into its staged output (`<score dir>/predictions/*.parquet`, renamed into place with the rest of
the stage's output, so a half-written one is never seen); its metrics are then computed from those
shards (`binary_metrics_of`, `mean_metrics_of`, `sums_of`, `unique_strings`). Beyond
LOCAL_ROWS predictions, Ray Data computes them, each worker summarizing its own blocks: the
driver holds a few numbers per block, never the rows, so a 10M-row test split costs the driver
what a 1,000-row one does. Up to LOCAL_ROWS the driver reads the few columns a metric needs
itself (at most a few MB), with the same summaries, instead of starting a Ray Data job whose
start-up costs seconds (most of a small split's scoring time).

Run directories written before hold one `predictions.parquet` per output; `read_predictions`
reads either form, sorted by sample_id as the single file always was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from reclora_ray.metrics import binary_block_stats, combine_binary_stats

SHARDS = "predictions"  # a folder of Parquet part files (written by Ray Data)
LEGACY_FILE = "predictions.parquet"  # one file (run directories from before the shards)
# Rows per part file (Ray Data's hint; at most twice this): a file per actor batch would leave
# thousands of small files.
ROWS_PER_SHARD = 100_000
LOCAL_ROWS = 100_000  # up to this many predictions the driver computes their metrics itself


def predictions_path(score_dir: Path) -> Path | None:
    """The shards folder, else the single file of an older run, else None."""
    score_dir = Path(score_dir)
    for path in (score_dir / SHARDS, score_dir / LEGACY_FILE):
        if path.exists():
            return path
    return None


def has_predictions(score_dir: Path) -> bool:
    return predictions_path(score_dir) is not None


def shard_files(score_dir: Path) -> list[Path]:
    path = predictions_path(score_dir)
    if path is None:
        return []
    return [path] if path.is_file() else sorted(path.glob("*.parquet"))


def scored_outputs(root: Path) -> list[Path]:
    """The scoring outputs under `root` (e.g. OUT/scores) that hold predictions, by name."""
    root = Path(root)
    return sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".") and has_predictions(p))


def read_predictions(score_dir: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """One output's predictions (the named columns only, when given), sorted by sample_id."""
    files = shard_files(score_dir)
    if not files:
        raise FileNotFoundError(f"{score_dir} holds no predictions ({SHARDS}/ or {LEGACY_FILE})")
    read = columns if columns is None or "sample_id" in columns else [*columns, "sample_id"]
    frame = _read_files(files, read).to_pandas().sort_values("sample_id", kind="stable", ignore_index=True)
    return frame if columns is None or "sample_id" in columns else frame[columns]


def _read_files(files: list[Path], columns: list[str] | None) -> pa.Table:
    """The named columns (all when None) of an output's part files, as one table."""
    tables = [pq.read_table(f, columns=columns) for f in files]
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


# --------------------------------------------------------------------------- Ray Data side


def write_predictions(ds, out_dir: Path) -> Path:
    """Write a scored Ray Dataset as Parquet shards under out_dir/predictions (run by the workers)."""
    path = Path(out_dir) / SHARDS
    ds.write_parquet(str(path), min_rows_per_file=ROWS_PER_SHARD, max_rows_per_file=2 * ROWS_PER_SHARD)
    if not any(path.glob("*.parquet")):  # an empty split writes nothing: say so rather than leave no file
        raise ValueError("the scoring stage produced no predictions: the split is empty")
    return path


def shard_rows(out_dir: Path) -> int:
    """How many predictions an output holds (from the files' footers)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(out_dir))


def read_shards(out_dir: Path, columns: list[str]):
    import ray.data

    return ray.data.read_parquet(str(Path(out_dir) / SHARDS)).select_columns(columns)  # projected at read time


def _small_batch(out_dir: Path, columns: list[str]) -> dict[str, np.ndarray] | None:
    """The columns of an output of at most LOCAL_ROWS predictions as one numpy batch, the form
    Ray Data hands `map_batches(batch_format="numpy")`; None for a larger output."""
    if shard_rows(out_dir) > LOCAL_ROWS:
        return None
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(_read_files(shard_files(out_dir), columns)).to_batch_format("numpy")


def _one_row(stats: dict) -> dict:
    return {key: np.asarray([value]) for key, value in stats.items()}


def _scalars(row: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def _binary_block(batch: dict) -> dict:
    stats = binary_block_stats(batch["label"], batch["p_yes"])
    stats.setdefault("lo", np.nan), stats.setdefault("hi", np.nan)
    for key in ("lo_pos", "lo_neg", "hi_pos", "hi_neg"):
        stats.setdefault(key, 0)
    return _one_row(stats)


def binary_metrics_of(out_dir: Path) -> dict[str, float]:
    """AUC, LogLoss and n of an output's predictions (label, p_yes), equal to `binary_metrics` on
    all its rows: one summary of all rows, or beyond LOCAL_ROWS a distributed sort by p_yes, one
    summary per sorted block, merged on the driver."""
    batch = _small_batch(out_dir, ["label", "p_yes"])
    if batch is not None:
        return combine_binary_stats([_scalars(_binary_block(batch))])
    summaries = (
        read_shards(out_dir, ["label", "p_yes"])
        .sort("p_yes")
        .map_batches(_binary_block, batch_size=None, batch_format="numpy")
        .take_all()
    )
    return combine_binary_stats([_scalars(s) for s in summaries])


def sums_of(out_dir: Path, columns: list[str], per_row: Callable[[dict], dict[str, np.ndarray]]) -> dict[str, float]:
    """Sums of per-row values over an output's predictions (`per_row`: numpy batch of `columns` ->
    {name: (rows,)}), beyond LOCAL_ROWS summed per block by the workers and merged on the driver;
    {name: sum} and n (rows)."""

    def sums(batch: dict) -> dict:
        rows = per_row(batch)
        return _one_row({"n": len(next(iter(batch.values())))} | {k: float(np.sum(v)) for k, v in rows.items()})

    batch = _small_batch(out_dir, columns)
    if batch is not None:
        parts = [_scalars(sums(batch))] if len(batch[columns[0]]) else []
    else:
        parts = read_shards(out_dir, columns).map_batches(sums, batch_size=None, batch_format="numpy").take_all()
    if not parts:
        return {"n": 0}
    return {k: float(sum(p[k] for p in parts)) for k in parts[0] if k != "n"} | {"n": int(sum(p["n"] for p in parts))}


def mean_metrics_of(out_dir: Path, columns: list[str], per_row: Callable[[dict], dict[str, np.ndarray]]) -> dict:
    """Means of per-row metrics over an output's predictions (see `sums_of`): {name: mean} and n."""
    totals = sums_of(out_dir, columns, per_row)
    n = totals.pop("n")
    if n == 0:
        raise ValueError("cannot compute metrics on zero rows")
    return {k: v / n for k, v in totals.items()} | {"n": n}


def unique_strings(out_dir: Path, column: str) -> list[str]:
    """The distinct values of a (low-cardinality) column of an output's predictions."""

    def distinct(batch: dict) -> dict:
        return {column: np.asarray(sorted({str(v) for v in batch[column]}), dtype=object)}

    batch = _small_batch(out_dir, [column])
    if batch is not None:
        return sorted(distinct(batch)[column].tolist())
    parts = read_shards(out_dir, [column]).map_batches(distinct, batch_size=None, batch_format="numpy").take_all()
    return sorted({str(r[column]) for r in parts})

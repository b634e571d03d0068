"""Batch scoring on Ray Data, shared by the CTR (`llm/score.py`) and next-item (`llm/next_item_score.py`)
stages: rows read by the workers, scored by an actor pool, written as Parquet shards into the
stage's staged output, metrics computed over the shards (`predictions.py`), and the pool's
progress shown on the driver as it goes.

The driver never holds the rows: it lists row ranges (a split's Parquet row groups, cut so every
actor of the pool gets work), and reads at most the sample_id column when the LLM rows score a
fixed subsample of the split.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from reclora_ray.console import Progress
from reclora_ray.predictions import write_predictions
from reclora_ray.rundir import write_json_atomic
from reclora_ray.runtime import init_ray
from reclora_ray.stages import StageRun

log = logging.getLogger(__name__)
CALLS_PER_ACTOR = 4  # at least this many ranges and calls per actor of a scoring pool


# --------------------------------------------------------------------------- reading rows


def row_ranges(path: Path, min_ranges: int = 1) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of a Parquet file (one read task each): its row groups, each cut into
    equal pieces when the file has fewer than `min_ranges` groups. A split written as one row
    group would otherwise be one block, which an actor pool scores on one actor however many it
    holds. A piece reads its whole row group, so a group is cut into at most `min_ranges` pieces,
    never into fixed-size ranges (quadratic on a large one-group file)."""
    meta = pq.ParquetFile(path).metadata
    bounds = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    pieces = -(-max(min_ranges, 1) // max(meta.num_row_groups, 1))
    ranges = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        cuts = np.unique(np.linspace(a, b, min(pieces, b - a) + 1).round().astype(int)) if b > a else []
        ranges += [(int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:])]
    return ranges


def read_slice(path: Path, lo: int, hi: int) -> pa.Table:
    """Rows [lo, hi) of a Parquet file, reading only the row groups they fall in."""
    pf = pq.ParquetFile(path)
    meta = pf.metadata
    starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    groups = [i for i in range(meta.num_row_groups) if starts[i] < hi and starts[i + 1] > lo]
    if not groups:
        return pf.schema_arrow.empty_table()
    return pf.read_row_groups(groups).slice(lo - int(starts[groups[0]]), hi - lo)


def _read_block(
    batch: dict, samples: str, retrieval: str | None, k_long: int, k_short: int, keep: np.ndarray | None
) -> pa.Table:
    """One range of a split's rows, its retrieved histories beside them (the retrieval output is
    row-aligned with the samples), cut to the kept sample ids."""
    from reclora_ray.retrieval.history import lists_to_padded

    lo, hi = int(batch["lo"][0]), int(batch["hi"][0])
    table = read_slice(Path(samples), lo, hi)
    if retrieval is not None:
        hist = read_slice(Path(retrieval), lo, hi)
        if not np.array_equal(hist.column("sample_id").to_numpy(), table.column("sample_id").to_numpy()):
            raise ValueError(
                f"the retrieval output {retrieval} does not match {samples} (rows {lo}..{hi}); "
                "re-run `reclora retrieve --overwrite`"
            )
        for name, k in (("hist_long", k_long), ("hist_short", k_short)):
            padded = lists_to_padded(hist.column(name), k)
            table = table.append_column(name, pa.FixedSizeListArray.from_arrays(pa.array(padded.reshape(-1)), k))
    if keep is not None:
        table = table.filter(pa.array(np.isin(table.column("sample_id").to_numpy(), keep)))
    return table


class SplitRows(NamedTuple):
    """A split's rows to score: a lazy Ray Dataset, and how many rows it holds (known up front,
    so the pool's calls can be sized without executing the dataset)."""

    dataset: Any
    n_rows: int


def split_rows(samples: Path, retrieval: Path | None = None, keep: np.ndarray | None = None, actors: int = 2):
    """A split's rows as a lazy Ray Dataset, read by the workers range by range, with their count:
    at least CALLS_PER_ACTOR ranges per actor of the `actors`-actor pool that will score them,
    where the split has as many rows.

    The reads take no CPU, at most `actors` at a time: on one CPU each they would be fused into
    the scoring actors, which then bundle `batch_size` one-row range items into one call and score
    the whole split on one actor, or wait for CPUs the actors hold.

    `retrieval`: OUT/retrieval/<split>.parquet, whose hist_long / hist_short (padded to the
    retrieval's k) join the rows; `keep`: the sample ids to score (None: all)."""
    import json

    import ray.data

    k_long = k_short = 0
    if retrieval is not None:
        meta = json.loads((Path(retrieval).parent / "retrieval.json").read_text())
        k_long, k_short = meta["k_long"], meta["k_short"]
        if pq.ParquetFile(retrieval).metadata.num_rows != pq.ParquetFile(samples).metadata.num_rows:
            raise ValueError(
                f"the retrieval output {retrieval} does not match {samples}; re-run `reclora retrieve --overwrite`"
            )
    ranges = row_ranges(samples, CALLS_PER_ACTOR * actors)
    if not ranges:
        raise ValueError(f"{samples} holds no rows to score")
    n_rows = len(keep) if keep is not None else ranges[-1][1]
    return SplitRows(
        ray.data.from_items([{"lo": lo, "hi": hi} for lo, hi in ranges], override_num_blocks=len(ranges)).map_batches(
            _read_block,
            batch_size=1,
            batch_format="numpy",
            num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=actors),
            fn_kwargs={
                "samples": str(samples),
                "retrieval": None if retrieval is None else str(retrieval),
                "k_long": k_long,
                "k_short": k_short,
                "keep": keep,
            },
        ),
        n_rows,
    )


def subsample_ids(samples: Path, n: int | None, seed: int) -> np.ndarray | None:
    """The sample ids of `fixed_subsample(split sorted by sample_id, n, seed)`, from the sample_id
    column alone; None when n keeps the whole split."""
    ids = np.sort(pq.read_table(samples, columns=["sample_id"]).column("sample_id").to_numpy())
    if n is None or n >= len(ids):
        return None
    return ids[np.sort(np.random.default_rng(seed).choice(len(ids), size=n, replace=False))]


# --------------------------------------------------------------------------- writing predictions


def _plain_block(frame: pd.DataFrame, data_dir: str | None) -> pa.Table:
    """A scored block as plain Arrow types (vector columns as fixed-size lists, not Ray's tensor
    extension: any Parquet reader reads them), with the catalogue ids beside the dense ones."""
    if data_dir is not None:
        from reclora_ray.data.catalogue import add_catalogue_ids

        frame = add_catalogue_ids(frame.reset_index(drop=True), data_dir)
    vectors = [
        c
        for c in frame.columns
        if "Tensor" in str(frame[c].dtype) or (len(frame) > 0 and isinstance(frame[c].iloc[0], (np.ndarray, list)))
    ]
    table = pa.Table.from_pandas(frame.drop(columns=vectors), preserve_index=False)
    for name in vectors:
        values = np.stack(frame[name].to_numpy())
        at = list(frame.columns).index(name)
        table = table.add_column(
            at, name, pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
        )
    return table


def call_rows(n_rows: int, max_rows: int, actors: int) -> int:
    """Rows per actor call: at most `max_rows`, and few enough that the split makes at least
    CALLS_PER_ACTOR calls per actor (Ray Data bundles small blocks up to a call's rows: 200 rows
    in calls of 128 would go 128 to one actor and 72 to the other)."""
    return max(1, min(max_rows, -(-n_rows // (CALLS_PER_ACTOR * actors))))


# --------------------------------------------------------------------------- progress


class RowCounter:
    """Rows scored so far, reported by the pool's actors (a zero-CPU Ray actor)."""

    def __init__(self):
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def total(self) -> int:
        return self.rows


def counted(actor: type) -> type:
    """`actor` (a Ray Data callable class) that also reports each call's rows to a RowCounter
    (its `counter` constructor argument), so the driver can show the pool's progress: the
    predictions themselves reach the writer only at the end on a small split."""

    class Counted(actor):
        def __init__(self, counter, **kwargs):
            super().__init__(**kwargs)
            self._counter = counter

        def __call__(self, rows):
            out = super().__call__(rows)
            self._counter.add.remote(len(rows))
            return out

    Counted.__name__ = Counted.__qualname__ = actor.__name__  # Ray names the operator after it
    return Counted


@contextmanager
def scoring_progress(what: str, total: int, counter, poll_s: float = 5.0):
    """console.Progress lines of the rows `counter` has counted, polled every `poll_s` seconds
    by a driver thread while the pool scores."""
    import ray

    progress = Progress(log, what, total, "rows")
    done, stop = [0], threading.Event()

    def poll() -> None:
        rows = ray.get(counter.total.remote())
        if rows > done[0]:
            progress.update(rows - done[0])
            done[0] = rows

    def watch() -> None:
        while not stop.wait(poll_s):
            try:
                poll()
            except Exception:  # the counter gone with a failing stage: the stage reports that
                return

    thread = threading.Thread(target=watch, name="scoring-progress", daemon=True)
    thread.start()
    try:
        yield
        stop.set()
        thread.join()
        poll()
        progress.close()
    finally:
        stop.set()


def score_with(
    actor,
    ctor_kwargs: dict,
    rows: SplitRows,
    *,
    stage: StageRun,
    num_gpus: float,
    max_call_rows: int,
    summarize: Callable[[Path], dict],
    info: dict,
    data_dir: Path | None = None,
) -> dict:
    """Score `rows` with an actor pool of `actor` (a callable class: pandas rows -> pandas
    predictions; calls of at most `max_call_rows` rows) into the stage's staged output: predictions
    as Parquet shards, then metrics.json = summarize(staged dir) | info (the marker and resolved
    config: `stage.write`). `data_dir`: add the catalogue ids (user_raw_id, item_raw_id) of the
    prepared data beside the dense ones."""
    import ray
    import ray.data

    cfg = stage.cfg
    init_ray(cfg)
    counter = ray.remote(num_cpus=0)(RowCounter).remote()
    per_call = call_rows(rows.n_rows, max_call_rows, cfg.score.concurrency)
    scored = rows.dataset.map_batches(
        counted(actor),
        fn_constructor_kwargs={"counter": counter, **ctor_kwargs},
        batch_size=per_call,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=cfg.score.concurrency),
        num_gpus=num_gpus,
    )
    scored = scored.map_batches(
        _plain_block,
        batch_size=None,
        batch_format="pandas",
        fn_kwargs={"data_dir": None if data_dir is None else str(data_dir)},
    )
    with stage.write() as tmp:
        try:
            with scoring_progress(f"scoring {stage.out.name}", rows.n_rows, counter):
                write_predictions(scored, tmp)
        finally:
            ray.kill(counter)
        metrics = summarize(tmp) | info
        write_json_atomic(tmp / "metrics.json", metrics)
    return metrics

"""Prepare a raw rating log: parse, label, k-core filter, split by global time, group per user.

    reclora prepare --config quickstart --out runs/q                       # packaged ML-100K
    reclora prepare --config ml-1m --raw-dir ~/data/ml-1m --out runs/ml1m

Writes the prepared-dataset contract (reclora_ray/data/prepared.py) into OUT/data. Ray Data
reads and parses the log in parallel (byte ranges of a text log, one task per gzipped file)
and writes the per-user sequences as sharded parquet; the global steps (id re-indexing, k-core
counting, the global sort and split, each behaviour's position in its user's sequence) are
columnar numpy on the driver: a few arrays of one number per behaviour, never Python objects.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reclora_ray.config import Config, DataConfig
from reclora_ray.data import next_item, text
from reclora_ray.data.checks import check_two_classes, drop_duplicates
from reclora_ray.data.prepared import SPLITS
from reclora_ray.data.readers import RawDataError, Source, open_source, quiet_ray_data_errors, unwrap_raw_data_error
from reclora_ray.rundir import RunDir
from reclora_ray.runtime import init_ray
from reclora_ray.stages import StageRun

log = logging.getLogger(__name__)

SEQUENCE_SHARD_ROWS = 4_000_000  # behaviours per sequences shard (one Ray Data block each)


class EmptyDatasetError(ValueError):
    """Nothing (or an empty split) is left after filtering."""


# --------------------------------------------------------------------------- entry points


def run_stage(cfg: Config, run: RunDir, key=None, overwrite: bool = False) -> Path:
    """The `prepare` stage of the stage table: OUT/data."""
    out = prepare_dataset(cfg, run.data, overwrite=overwrite)
    log.info("prepared dataset in %s", out)
    return out


def raw_files(cfg: Config) -> list[Path]:
    """Every raw file prepare reads (their sizes and mtimes go into its fingerprint); opening the
    source checks that its folder and files exist before any work starts."""
    return open_source(cfg.data.dataset, cfg.data.raw_dir, cfg.data).input_files()


def prepare_dataset(cfg: Config, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Prepare cfg.data into out_dir (normally OUT/data); a no-op when it is already there."""
    out_dir = Path(out_dir)
    stage = StageRun("prepare", cfg, out_dir.parent, out=out_dir)
    if stage.up_to_date(overwrite):
        return out_dir
    source = open_source(cfg.data.dataset, cfg.data.raw_dir, cfg.data)
    started = time.perf_counter()
    init_ray(cfg)
    log.info("reading the %s log from %s", source.name, source.describe())
    behaviours = read_behaviours(source, cfg.data.blocks)
    split = split_behaviours(behaviours, cfg.data, source, seed=cfg.run.seed)
    items = item_table(source, split.item_raw, cfg.data)
    users = user_table(source, split.user_raw, cfg.data.text.profile)
    check_split_classes(split, cfg.data, source)  # after the item and user files: their errors name a line
    with stage.write() as tmp:
        log.info("writing %s", out_dir)
        items.to_parquet(tmp / "items.parquet", index=False)
        users.to_parquet(tmp / "users.parquet", index=False)
        write_samples(tmp / "samples", split)
        write_sequences(tmp / "sequences.parquet", split, cfg.data.blocks)
        tasks = next_item_tables(split, cfg, len(items))
        next_item.write_next_item(tmp / next_item.NEXT_ITEM_DIR, tasks)
        meta = build_meta(cfg, stage.fingerprint, source, split, items, users)
        meta["next_item"] = {
            **dataclasses.asdict(cfg.data.next_item),
            "seed": cfg.run.seed,
            "rows": {s: t.num_rows for s, t in tasks.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info(
        "prepared %s in %.1f s: %d behaviours, %d users, %d items; samples %s",
        source.name,
        time.perf_counter() - started,
        meta["n_rows"],
        meta["n_users"],
        meta["n_items"],
        " / ".join(f"{s} {meta['splits'][s]['rows']}" for s in SPLITS),
    )
    return out_dir


# --------------------------------------------------------------------------- the steps' data

COLUMNS = ("user", "item", "rating", "timestamp", "label")  # one value per behaviour


@dataclass
class Behaviours:
    """The parsed log on the driver: flat columns (one value per behaviour, dense ids numbered in
    raw-id order), the raw id of each code, and what reading counted."""

    user: np.ndarray  # int32
    item: np.ndarray  # int32
    rating: np.ndarray
    timestamp: np.ndarray
    label: np.ndarray | None  # an explicit 0/1 label column (generic logs); None: from the rating
    user_raw: pa.Array
    item_raw: pa.Array
    n_parsed: int
    n_duplicates: int


@dataclass
class SplitRows:
    """One split: its samples' rows (global order) and the sample_id of the first."""

    rows: np.ndarray
    first_sample_id: int
    rows_before_subsample: int = 0
    sample_offsets: np.ndarray | None = None  # the test subsample (data.test_subsample), sorted

    def sample_rows(self) -> np.ndarray:
        return self.rows if self.sample_offsets is None else self.rows[self.sample_offsets]


@dataclass
class SplitLog:
    """Labelled, k-core filtered behaviours in global order, each one's position in its user's
    sequence, and the three splits: everything the writers and meta.json read."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    label: np.ndarray  # int8
    user_raw: pa.Array
    item_raw: pa.Array
    pos: np.ndarray  # int32: behaviours of the user before this one
    by_user: np.ndarray | None  # rows by (user, time); released once the sequences are written
    offsets: np.ndarray  # (n_users + 1,) start of each user's rows in by_user
    splits: dict[str, SplitRows]
    n_parsed: int
    n_duplicates: int
    n_read: int  # behaviours before k-core filtering


# --------------------------------------------------------------------------- read


def read_behaviours(source: Source, blocks: int | None) -> Behaviours:
    """The parsed log, gathered block by block into flat columns on the driver."""
    tables = []
    rows = 0
    try:
        with quiet_ray_data_errors():
            for table in source.read_log(blocks).iter_batches(batch_size=None, batch_format="pyarrow"):
                tables.append(table)
                rows += table.num_rows
    except RawDataError as exc:  # raised in a Ray task: arrives wrapped in Ray's task error
        raise unwrap_raw_data_error(exc) from None
    if rows == 0:
        raise EmptyDatasetError(f"{source.describe()}: the {source.name} log holds no ratings")
    log.info("parsed %d ratings in %d blocks", rows, len(tables))
    table = source.finish_log(pa.concat_tables(tables))
    user, user_raw = dense_codes(table["user"])
    item, item_raw = dense_codes(table["item"])
    b = {"user": user, "item": item, "rating": table["rating"].to_numpy(), "timestamp": table["timestamp"].to_numpy()}
    if "label" in table.column_names:  # an explicit 0/1 label column (generic logs)
        b["label"] = table["label"].to_numpy()
    keep, n_duplicates = drop_duplicates(
        b,
        source.rules,
        f"{source.describe()}: the {source.name} log",
        lambda row: (
            f"user {user_raw[int(b['user'][row])]} item {item_raw[int(b['item'][row])]} "
            f"rating {b['rating'][row]:g} timestamp {b['timestamp'][row]}"
        ),
    )
    if keep is not None:
        log.warning(
            "dropped %d exact duplicate rows of %d (data.duplicates=refuse makes them an error)", n_duplicates, rows
        )
        b = {name: values[keep] for name, values in b.items()}
    return Behaviours(
        **{c: b.get(c) for c in COLUMNS}, user_raw=user_raw, item_raw=item_raw, n_parsed=rows, n_duplicates=n_duplicates
    )


def dense_codes(values: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Dense int32 codes numbered in raw-id order, and the raw id of each code."""
    encoded = pc.dictionary_encode(values.combine_chunks())
    order = pc.sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank[encoded.indices.to_numpy()], encoded.dictionary.take(pa.array(order))


# --------------------------------------------------------------------------- protocol


def label_rule(data: DataConfig, source: Source) -> tuple[str, float]:
    if data.label_threshold is not None:
        return ">=", float(data.label_threshold)
    return (">" if source.label_strict else ">="), source.default_label_threshold


def k_core_mask(user: np.ndarray, item: np.ndarray, n_users: int, n_items: int, k: int) -> np.ndarray:
    """Rows kept by k-core filtering, repeated until every user and item has >= k rows."""
    keep = np.ones(len(user), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        users_ok = np.bincount(user[keep], minlength=n_users) >= k
        items_ok = np.bincount(item[keep], minlength=n_items) >= k
        drop = keep & ~(users_ok[user] & items_ok[item])
        if not drop.any():
            log.info("%d-core filtering: stable after %d rounds, %d of %d rows kept", k, rounds, keep.sum(), len(keep))
            return keep
        keep &= ~drop


def _compact(codes: np.ndarray, raw: pa.Array, n: int) -> tuple[np.ndarray, pa.Array]:
    present = np.bincount(codes, minlength=n) > 0
    remap = np.cumsum(present, dtype=np.int64).astype(np.int32) - 1
    return remap[codes], raw.filter(pa.array(present))


def split_behaviours(b: Behaviours, data: DataConfig, source: Source, seed: int) -> SplitLog:
    """Label, filter and split the behaviours.

    Global order = (timestamp, user raw id, item raw id): ties broken by ids, never by file order.
    """
    cols = {"user": b.user, "item": b.item, "rating": b.rating, "timestamp": b.timestamp}
    if b.label is None:
        op, threshold = label_rule(data, source)
        cols["label"] = ((b.rating > threshold) if op == ">" else (b.rating >= threshold)).astype(np.int8)
        rule = f"rating {op} {threshold:g}"
    else:
        cols["label"] = b.label
        rule = "the label column"
    check_two_classes(cols["label"], f"{source.describe()}: the {source.name} log", rule, data.single_class)
    user_raw, item_raw = b.user_raw, b.item_raw
    n_read = len(cols["user"])
    if data.k_core > 0:
        keep = k_core_mask(cols["user"], cols["item"], len(user_raw), len(item_raw), data.k_core)
        cols = {name: values[keep] for name, values in cols.items()}
        if len(cols["user"]) == 0:
            raise EmptyDatasetError(
                f"{source.name}: no ratings left after {data.k_core}-core filtering of {n_read} rows; lower data.k_core"
            )
        cols["user"], user_raw = _compact(cols["user"], user_raw, len(user_raw))
        cols["item"], item_raw = _compact(cols["item"], item_raw, len(item_raw))

    order = np.lexsort((cols["item"], cols["user"], cols["timestamp"]))
    cols = {name: values[order] for name, values in cols.items()}
    del order
    user = cols["user"]
    n_users = len(user_raw)
    # Each user's behaviours in global order: a stable sort by user keeps time order inside.
    by_user = np.argsort(user, kind="stable")
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=n_users), out=offsets[1:])
    pos = np.empty(len(user), dtype=np.int32)
    pos[by_user] = np.arange(len(pos), dtype=np.int64) - offsets[user[by_user]]

    sample_rows = np.flatnonzero(pos >= data.min_history)  # global order
    n_samples = len(sample_rows)
    bounds = np.floor(np.cumsum(data.split) * n_samples + 1e-9).astype(np.int64)
    bounds[-1] = n_samples
    starts = np.concatenate([[0], bounds[:-1]])
    splits = {}
    for name, start, stop in zip(SPLITS, starts, bounds):
        if stop <= start:
            raise EmptyDatasetError(
                f"{source.name}: the {name} split is empty ({n_samples} samples after filtering, "
                f"min_history {data.min_history}, split {data.split})"
            )
        splits[name] = SplitRows(sample_rows[start:stop], int(start), rows_before_subsample=int(stop - start))
    test = splits["test"]
    if data.test_subsample is not None and data.test_subsample < len(test.rows):
        chosen = np.random.default_rng(seed).choice(len(test.rows), size=data.test_subsample, replace=False)
        test.sample_offsets = np.sort(chosen)
    return SplitLog(
        **cols,
        user_raw=user_raw,
        item_raw=item_raw,
        pos=pos,
        by_user=by_user,
        offsets=offsets,
        splits=splits,
        n_parsed=b.n_parsed,
        n_duplicates=b.n_duplicates,
        n_read=n_read,
    )


def check_split_classes(b: SplitLog, data: DataConfig, source: Source) -> None:
    op, threshold = label_rule(data, source)
    for name, split in b.splits.items():
        check_two_classes(
            b.label[split.sample_rows()],
            f"{source.name}: the {name} split",
            f"rating {op} {threshold:g}",
            data.single_class,
        )


# --------------------------------------------------------------------------- items and users


def item_table(source: Source, raw_ids: pa.Array, data: DataConfig) -> pd.DataFrame:
    meta = source.read_items(raw_ids.to_numpy(zero_copy_only=False)).drop_duplicates("raw_id").set_index("raw_id")
    wanted = pd.Index(raw_ids.to_numpy(zero_copy_only=False))
    missing = wanted.difference(meta.index)
    if len(missing):
        raise RawDataError(
            f"{source.describe()}: {len(missing)} rated items have no record in the {source.name} item file "
            f"(e.g. id {missing[0]})"
        )
    if data.cold_items:  # after the items with behaviours, so their ids stay those of the log
        wanted = wanted.append(meta.index.difference(wanted).sort_values())
    items = meta.loc[wanted].reset_index()
    items.insert(0, "item_id", np.arange(len(items), dtype=np.int64))
    items["text"] = text.descriptions(items, data.text.description or source.description_parts())
    return items


def user_table(source: Source, raw_ids: pa.Array, profile_parts=None) -> pd.DataFrame:
    users = pd.DataFrame({"user_id": np.arange(len(raw_ids), dtype=np.int64), "raw_id": raw_ids.to_pandas()})
    profiles = source.read_users()
    if profiles is None:
        users["profile_text"] = ""
        return users
    profiles = profiles.drop_duplicates("raw_id").set_index("raw_id")
    missing = pd.Index(users["raw_id"]).difference(profiles.index)
    if len(missing):
        raise RawDataError(
            f"{source.describe()}: {len(missing)} users have no record in the {source.name} user file (e.g. id {missing[0]})"
        )
    users = users.join(profiles, on="raw_id")
    return text.add_profile_text(users, profile_parts)


# --------------------------------------------------------------------------- write


def split_samples(b: SplitLog, name: str) -> pa.Table:
    split = b.splits[name]
    rows = split.rows
    sample_id = np.arange(len(rows), dtype=np.int64) + split.first_sample_id
    if split.sample_offsets is not None:
        rows, sample_id = rows[split.sample_offsets], sample_id[split.sample_offsets]
    return pa.table(
        {
            "sample_id": sample_id,
            "user_id": b.user[rows].astype(np.int64),
            "item_id": b.item[rows].astype(np.int64),
            "label": b.label[rows],
            "rating": b.rating[rows],
            "timestamp": b.timestamp[rows],
            "pos": b.pos[rows],
        }
    )


def next_item_tables(b: SplitLog, cfg: Config, n_items: int) -> dict[str, pa.Table]:
    """The next-item rows of every split, from the split's behaviours before any test subsample."""
    keys = next_item.interaction_keys(b.user, b.item, n_items)
    tables = {}
    for i, name in enumerate(SPLITS):
        split = b.splits[name]
        rows = split.rows
        tables[name] = next_item.next_item_table(
            sample_id=np.arange(len(rows), dtype=np.int64) + split.first_sample_id,
            user=b.user[rows],
            item=b.item[rows],
            timestamp=b.timestamp[rows],
            pos=b.pos[rows],
            keys=keys,
            n_items=n_items,
            cfg=cfg.data.next_item,
            rng=np.random.default_rng([cfg.run.seed, i]),
        )
    return tables


def write_samples(directory: Path, b: SplitLog) -> None:
    directory.mkdir()
    for name in SPLITS:
        pq.write_table(split_samples(b, name), directory / f"{name}.parquet")


def group_user_rows(block: pa.Table) -> pa.Table:
    """One row per user from that user's consecutive behaviour rows (a block never splits a user)."""
    users = block["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    offsets = pa.array(np.r_[starts, len(users)].astype(np.int32))

    def lists(column: str) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, block[column].combine_chunks())

    return pa.table(
        {
            "user_id": users[starts],
            "item_ids": lists("item_id"),
            "ratings": lists("rating"),
            "labels": lists("label"),
            "timestamps": lists("timestamp"),
        }
    )


def write_sequences(path: Path, b: SplitLog, blocks: int | None) -> None:
    """sequences.parquet as a folder of shards: the driver hands Ray Data user-aligned blocks in
    (user, time) order; Ray Data tasks build the per-user lists and write the shards."""
    import ray

    by_user, b.by_user = b.by_user, None  # released with the local below (ML-25M: 200 MB)
    offsets = b.offsets
    n = len(by_user)
    n_shards = max(blocks or 1, -(-n // SEQUENCE_SHARD_ROWS))
    # Shard edges at user boundaries near equal row counts.
    edges = np.unique(np.searchsorted(offsets, np.linspace(0, n, n_shards + 1).astype(np.int64)))
    edges[-1] = len(offsets) - 1
    shards = []
    for first_user, stop_user in zip(edges[:-1], edges[1:]):
        rows = by_user[offsets[first_user] : offsets[stop_user]]
        if len(rows):
            shards.append(
                pa.table(
                    {
                        "user_id": b.user[rows].astype(np.int64),
                        "item_id": b.item[rows],
                        "rating": b.rating[rows],
                        "label": b.label[rows],
                        "timestamp": b.timestamp[rows],
                    }
                )
            )
    del by_user
    ray.data.from_arrow(shards).map_batches(group_user_rows, batch_size=None, batch_format="pyarrow").write_parquet(
        str(path)
    )


# --------------------------------------------------------------------------- meta


def split_counts(b: SplitLog, name: str, n_users: int, n_items: int) -> dict:
    table = split_samples(b, name)
    counts = {
        "rows": table.num_rows,
        "users": int(np.count_nonzero(np.bincount(table["user_id"].to_numpy(), minlength=n_users))),
        "items": int(np.count_nonzero(np.bincount(table["item_id"].to_numpy(), minlength=n_items))),
        "positive_rate": float(pc.mean(table["label"]).as_py()),
        "first_sample_id": b.splits[name].first_sample_id,
    }
    if name == "test":
        counts["rows_before_subsample"] = b.splits["test"].rows_before_subsample
    return counts


def build_meta(cfg: Config, fp: str, source: Source, b: SplitLog, items: pd.DataFrame, users: pd.DataFrame) -> dict:
    op, threshold = label_rule(cfg.data, source)
    n_users, n_items = len(users), len(items)
    user_fields = [c for c in users.columns if c not in ("user_id", "raw_id", "profile_text")]
    item_fields = [c for c in items.columns if c not in ("item_id", "raw_id", "text")]
    vocab = {c: int(users[c].nunique()) for c in user_fields}
    for c in item_fields:
        if c in ("title", "details"):
            continue
        values = items[c].dropna()
        listed = len(values) and isinstance(values.iloc[0], (list, tuple, np.ndarray))
        vocab[c] = len({v for vs in values for v in vs}) if listed else int(values.nunique())
    label = f"column {source.label_column!r}" if source.label_column else f"rating {op} {threshold:g}"
    return {
        "dataset": source.name,
        "source": source.describe(),
        "fingerprint": fp,
        "label_rule": label,
        "label_threshold": None if source.label_column else threshold,
        "label_op": "column" if source.label_column else op,
        "rated": source.rated,
        "text": dataclasses.asdict(cfg.data.text),
        "k_core": cfg.data.k_core,
        "min_history": cfg.data.min_history,
        "split": list(cfg.data.split),
        "split_order": "global time: timestamp, then user raw id, then item raw id",
        "timestamp_field": source.timestamp_field,
        "n_parsed": b.n_parsed,
        "n_read": b.n_read,
        "n_rows": len(b.user),
        "dropped": {"exact_duplicates": b.n_duplicates, "k_core": b.n_read - len(b.user)},
        "n_samples": sum(len(s.rows) for s in b.splits.values()),
        "n_users": n_users,
        "n_items": n_items,
        "n_cold_items": n_items - len(b.item_raw),
        "splits": {s: split_counts(b, s, n_users, n_items) for s in SPLITS},
        "test_subsample": (
            {
                "size": len(b.splits["test"].sample_offsets),
                "seed": cfg.run.seed,
                "applied": "samples/test.parquet holds only the subsample; sequences keep every behaviour",
            }
            if b.splits["test"].sample_offsets is not None
            else None
        ),
        "user_fields": user_fields,
        "item_fields": item_fields,
        # The CRM's default item features: the mapped categorical fields of a generic items table.
        "item_features": list(cfg.data.files.items.fields) if cfg.data.dataset == "interactions" else None,
        "vocab": vocab,
    }

"""`reclora export-data`: a benchmark's raw files in the generic layout of `data.dataset: interactions`.

    reclora export-data --config quickstart --out data/ml100k-csv   # the packaged ML-100K
    reclora run --config data/ml100k-csv/reclora.yaml --out runs/own

writes OUT/interactions/*.csv (user_id, item_id, rating, timestamp; several files), OUT/items.csv
(item_id, title, year, genres as "A|B"[, authors]), OUT/users.csv when the dataset has profiles,
and OUT/reclora.yaml: the config (extending --config) that reads them back with the benchmark's
label rule and Figure 2 wording, so the prepared data and the report match the benchmark path.
The files are also a template for your own logs (README, "Your own data").
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from reclora_ray.data.readers import open_source
from reclora_ray.data.text import WORDING
from reclora_ray.runtime import init_ray

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="quickstart", help="the benchmark config whose data is exported")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist)")
    parser.add_argument("--files", type=int, default=4, help="interaction files to write")


def export_data(config: str, overrides: list[str], out: str | Path, files: int = 4) -> Path:
    from reclora_ray.config import load_config

    cfg = load_config(config, overrides)
    data = cfg.data
    if data.dataset == "interactions":
        raise ValueError(f"config {config} already reads the generic layout (data.dataset: interactions)")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; export-data writes a new folder")
    source = open_source(data.dataset, data.raw_dir)
    init_ray(cfg)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        has_users = write_files(source, data, tmp, files)
        (tmp / "reclora.yaml").write_text(exported_config(config, source, data, out, has_users))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)
    log.info("exported %s to %s; prepare it with --config %s", source.describe(), out, out / "reclora.yaml")
    return out


def write_files(source, data, tmp: Path, files: int) -> list[str] | None:
    """The log, items and users as CSV; the users' profile fields (None without a user file)."""
    log_ds = source.read_log(data.blocks).materialize()
    names = {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"}
    log_ds.repartition(files).map_batches(
        lambda t: t.rename_columns([names[c] for c in t.column_names]), batch_format="pyarrow"
    ).write_csv(str(tmp / "interactions"))
    raw_items = np.sort(np.asarray(log_ds.unique("item")))
    items = source.read_items(raw_items).drop_duplicates("raw_id").rename(columns={"raw_id": "item_id"})
    for name in ("genres", "authors"):
        if name in items:
            items[name] = ["|".join(v) for v in items[name]]
    items[["item_id", "title", *item_fields(items)]].to_csv(tmp / "items.csv", index=False)
    users = source.read_users()
    if users is None:
        return None
    users.rename(columns={"raw_id": "user_id"}).to_csv(tmp / "users.csv", index=False)
    return [c for c in users.columns if c != "raw_id"]


def item_fields(items) -> list[str]:
    return [c for c in ("year", "genres", "authors") if c in items]


def exported_config(config: str, source, data, out: Path, user_fields: list[str] | None) -> str:
    wording = WORDING[data.dataset]
    threshold = data.label_threshold
    if threshold is None:  # the benchmark's rule as a >= threshold (ML-25M's "> 3" on half stars is ">= 3.5")
        threshold = source.default_label_threshold + (0.5 if source.label_strict else 0.0)
    items = pd.read_csv(out.with_name(f".{out.name}.tmp") / "items.csv", nrows=0)
    files = {
        "interactions": {
            "paths": ["interactions"],
            "user": "user_id",
            "item": "item_id",
            "timestamp": "timestamp",
            "rating": "rating",
        },
        "items": {"paths": ["items.csv"], "item": "item_id", "title": "title", "fields": item_fields(items)},
    }
    if user_fields is not None:
        files["users"] = {"paths": ["users.csv"], "user": "user_id", "fields": user_fields}
    exported = {
        "extends": config,
        "data": {
            "dataset": "interactions",
            "raw_dir": str(out.resolve()),
            "label_threshold": threshold,
            "files": files,
            "text": {
                "description": list(source.description_parts()),
                "prompt": list(wording.lines),
                "history_item": wording.history_item,
            },
        },
    }
    header = f"# `reclora export-data --config {config}`: {source.describe()} in the generic layout\n"
    return header + yaml.safe_dump(exported, sort_keys=False, width=120)


def main(args: argparse.Namespace) -> int:
    export_data(args.config, args.overrides, args.out, args.files)
    return 0

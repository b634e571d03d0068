"""Readers for every raw format: the rating log as a Ray Dataset, item and user tables as pandas.

One module per format (movielens, goodreads, interactions: your own CSV / Parquet), all over
base (the `Source` interface and the shared parsing); `open_source` picks one.

The log is the large part (25M lines for ML-25M, hundreds of millions for GoodReads), so it is
read by Ray Data tasks: a plain-text log is cut into byte ranges aligned to lines, a gzipped one
is streamed per file, and each task parses its share with pyarrow into columnar blocks of
    user (int64, or string for GoodReads), item (int64), rating (float32), timestamp (int64, s).
Item and user files are small and read on the driver. Every malformed input stops with a
RawDataError naming the file, the line and the field.
"""

from __future__ import annotations

from pathlib import Path

from reclora_ray.config import DataConfig
from reclora_ray.data.checks import LogRules, RawDataError
from reclora_ray.data.readers.base import (
    DelimitedFormat,
    Source,
    byte_ranges,
    parse_delimited_range,
    quiet_ray_data_errors,
    unwrap_raw_data_error,
)
from reclora_ray.data.readers.goodreads import GoodReads
from reclora_ray.data.readers.movielens import ML1M, ML25M, ML100K, PackagedML100K, packaged_ml100k_dir


def open_source(dataset: str, raw_dir: str | None, data: DataConfig | None = None) -> Source:
    """The reader for `dataset` under the rules of `data` (rating range, timestamp unit,
    duplicates; the files of a generic log); checks that its folder and files exist before any work starts."""
    if dataset == "interactions":
        from reclora_ray.data.readers.interactions import Interactions

        if data is None:
            raise ValueError("dataset interactions needs its data config (data.files)")
        source = Interactions(data.files, raw_dir)
        source.check_files()
        low, high = data.rating_range or source.rating_range
        source.rules = LogRules(low, high, data.timestamp_unit, data.duplicates)
        return source
    classes = {"ml-100k": ML100K, "ml-1m": ML1M, "ml-25m": ML25M, "goodreads": GoodReads}
    if dataset not in classes:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(classes)}")
    if raw_dir is None:
        if dataset != "ml-100k":
            raise ValueError(f"dataset {dataset} needs its raw folder: pass --raw-dir or set data.raw_dir")
        source = PackagedML100K()
    else:
        folder = Path(raw_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"raw data folder {folder} does not exist (data.raw_dir / --raw-dir)")
        source = classes[dataset](folder)
    source.check_files()
    if data is not None:
        low, high = data.rating_range or source.rating_range
        source.rules = LogRules(low, high, data.timestamp_unit, data.duplicates)
    return source


__all__ = [
    "DelimitedFormat",
    "GoodReads",
    "LogRules",
    "ML1M",
    "ML25M",
    "ML100K",
    "PackagedML100K",
    "RawDataError",
    "Source",
    "byte_ranges",
    "open_source",
    "packaged_ml100k_dir",
    "parse_delimited_range",
    "quiet_ray_data_errors",
    "unwrap_raw_data_error",
]

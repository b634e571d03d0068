"""`data.dataset: interactions`: your own logs as CSV or Parquet, with the columns named in the config.

    data:
      dataset: interactions
      raw_dir: ~/logs                      # relative paths below are read from here
      files:
        interactions: {paths: ["clicks/*.parquet"], user: uid, item: sku, timestamp: ts, label: clicked}
        items: {paths: [catalogue.csv], item: sku, title: name, text: blurb, fields: [brand, tags]}
        users: {paths: [users.csv], user: uid, fields: [country]}   # optional

Paths are files, globs, folders (every .csv / .parquet inside) or pyarrow URIs (s3://, gs://, ...).
The log is parsed by Ray Data tasks, one per CSV file or Parquet row group, into the same columns
as the benchmark readers (user, item, rating, timestamp, and label when a 0/1 column is mapped);
ids are strings, or integers when every id of the log is a number. Items and users are read on
the driver. Every bad value stops with a RawDataError naming the file, the line (CSV, header =
line 1) or row (Parquet, from 1) and the field.
"""

from __future__ import annotations

import csv
import glob
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from reclora_ray.config import DataFilesConfig
from reclora_ray.data import text
from reclora_ray.data.readers.base import RawDataError, Source, raising_original_errors

SUFFIXES = {".csv": "csv", ".gz": "csv", ".parquet": "parquet", ".pq": "parquet"}
NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
INTEGER_ID = r"^-?\d{1,18}$"
ISO_DATE = r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$"


# --------------------------------------------------------------------------- files


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), location


def _kind(path: str) -> str | None:
    name = path.lower()
    suffix = ".csv" if name.endswith(".csv.gz") else Path(name).suffix
    return SUFFIXES.get(suffix) if suffix != ".gz" or name.endswith(".csv.gz") else None


def resolve_paths(patterns: list[str], raw_dir: str | None, what: str) -> list[str]:
    """Every file the patterns name, in sorted order; folders give their .csv / .parquet files."""
    found: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            fs, inner = _filesystem(pattern)
            info = fs.get_file_info(inner)
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                found += sorted(
                    f"{pattern.split('://')[0]}://{i.path}"
                    for i in infos
                    if i.type == pafs.FileType.File and _kind(i.path)
                )
            elif info.type == pafs.FileType.File:
                found.append(pattern)
            else:
                raise FileNotFoundError(f"data.files.{what}.paths: {pattern} does not exist")
            continue
        path = Path(pattern).expanduser()
        if not path.is_absolute() and raw_dir is not None:
            path = Path(raw_dir).expanduser() / path
        matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)]
        files = []
        for match in matches:
            if Path(match).is_dir():
                files += sorted(str(p) for p in Path(match).rglob("*") if p.is_file() and _kind(str(p)))
            elif Path(match).is_file():
                files.append(match)
        if not files:
            raise FileNotFoundError(f"data.files.{what}.paths: {path} matches no file")
        found += files
    for path in found:
        if _kind(path) is None:
            raise RawDataError(f"{path}: not a .csv, .csv.gz or .parquet file (data.files.{what}.paths)")
    return found


def _csv_table(path: str, columns: list[str], what: str) -> pa.Table:
    """The named columns of a CSV file, as strings, after checking the header holds them."""
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner, compression="detect") as stream:
        data = stream.read()
    header_line = data.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    if not header_line.strip():
        raise RawDataError(f"{path}: empty file (expected a header line with {columns})")
    header = next(csv.reader([header_line]))
    _check_columns(path, header, columns, what)
    try:
        return pcsv.read_csv(
            io.BytesIO(data),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in columns},
                include_columns=columns,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise RawDataError(f"{path}: {exc}") from None


def _check_columns(path: str, present, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in present]
    if missing:
        raise RawDataError(
            f"{path}: no column {missing[0]!r} (mapped in data.files.{what}); the file has {list(present)}"
        )


def _read_table(path: str, columns: list[str], what: str) -> tuple[pa.Table, str]:
    """A small file read whole: (table, 'line' or 'row' numbering)."""
    if _kind(path) == "csv":
        table, unit = _csv_table(path, columns, what), "line"
    else:
        fs, inner = _filesystem(path)
        schema = pq.read_schema(inner, filesystem=fs)
        _check_columns(path, schema.names, columns, what)
        table, unit = pq.read_table(inner, columns=columns, filesystem=fs), "row"
    if table.num_rows == 0:
        raise RawDataError(f"{path}: empty file (no rows)")
    return table, unit


def _where(path: str, unit: str, first: int, index: int) -> str:
    """`file, line 7` (CSV: the header is line 1) or `file, row 7` (Parquet: rows from 1)."""
    return f"{path}, {unit} {first + index + (2 if unit == 'line' else 1)}"


# --------------------------------------------------------------------------- values


def _first(mask: pa.Array) -> int:
    return pc.index(mask, True).as_py()


def _no_empty(col: pa.Array, name: str, at) -> None:
    empty = pc.is_null(col)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        empty = pc.or_(empty, pc.equal(pc.utf8_trim_whitespace(col), ""))
    if pc.any(empty).as_py():
        raise RawDataError(f"{at(_first(empty))}: field {name!r} is empty")


def ids(col: pa.Array, name: str, at) -> pa.Array:
    _no_empty(col, name, at)
    if pa.types.is_integer(col.type):
        return pc.cast(col, pa.string())
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        raise RawDataError(f"{at(0)}: field {name!r} must hold strings or integers, not {col.type}")
    return pc.utf8_trim_whitespace(pc.cast(col, pa.string()))


def numbers(col: pa.Array, name: str, at) -> pa.Array:
    _no_empty(col, name, at)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return pc.cast(col, pa.float64())
    if not pa.types.is_string(col.type):
        raise RawDataError(f"{at(0)}: field {name!r} is not numeric ({col.type})")
    ok = pc.match_substring_regex(col, NUMBER)
    if not pc.all(ok).as_py():
        index = _first(pc.invert(ok))
        raise RawDataError(f"{at(index)}: field {name!r} is not a number: {col[index].as_py()!r}")
    return pc.cast(pc.utf8_trim_whitespace(col), pa.float64())


def timestamps(col: pa.Array, name: str, at) -> pa.Array:
    """Unix seconds (int64) from numbers, ISO-8601 strings or Parquet timestamps."""
    _no_empty(col, name, at)
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        return pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return pc.cast(pc.floor(pc.cast(col, pa.float64())), pa.int64())
    if not pa.types.is_string(col.type):
        raise RawDataError(f"{at(0)}: field {name!r} is not a time ({col.type})")
    numeric, iso = pc.match_substring_regex(col, NUMBER), pc.match_substring_regex(col, ISO_DATE)
    if pc.all(numeric).as_py():
        return pc.cast(pc.floor(numbers(col, name, at)), pa.int64())
    if not pc.all(iso).as_py():
        neither = pc.invert(pc.or_(numeric, iso))
        index = _first(neither) if pc.any(neither).as_py() else _first(pc.invert(iso))
        raise RawDataError(
            f"{at(index)}: field {name!r} is not unix seconds or an ISO-8601 date: {col[index].as_py()!r}"
        )
    try:
        return pc.cast(pc.cast(col, pa.timestamp("s", tz="UTC")), pa.int64())
    except pa.ArrowInvalid as exc:
        raise RawDataError(f"{at(0)}: field {name!r}: {exc}") from None


def labels(col: pa.Array, name: str, at) -> pa.Array:
    if pa.types.is_boolean(col.type):
        _no_empty(col, name, at)
        return pc.cast(col, pa.int8())
    values = numbers(col, name, at)
    bad = pc.invert(pc.is_in(values, value_set=pa.array([0.0, 1.0])))
    if pc.any(bad).as_py():
        index = _first(bad)
        raise RawDataError(f"{at(index)}: field {name!r} must be 0 or 1, got {col[index].as_py()!r}")
    return pc.cast(values, pa.int8())


# --------------------------------------------------------------------------- the log (Ray tasks)


def log_columns(files: DataFilesConfig) -> dict[str, str]:
    """Output column -> the file's column name."""
    log = files.interactions
    mapping = {"user": log.user, "item": log.item, "timestamp": log.timestamp}
    if log.rating is not None:
        mapping["rating"] = log.rating
    if log.label is not None:
        mapping["label"] = log.label
    return mapping


def parse_log_part(task: dict, mapping: dict[str, str]) -> pa.Table:
    """One CSV file or Parquet row group -> user, item (strings), rating, timestamp[, label]."""
    path, columns = task["path"], list(dict.fromkeys(mapping.values()))
    if task["row_group"] < 0:
        table, unit = _csv_table(path, columns, "interactions"), "line"
    else:
        fs, inner = _filesystem(path)
        table, unit = pq.ParquetFile(inner, filesystem=fs).read_row_group(task["row_group"], columns=columns), "row"
    if table.num_rows == 0:
        if task["row_group"] < 0:
            raise RawDataError(f"{path}: empty file (a header and no rows)")
        return empty_log(mapping)  # an empty row group: the file as a whole was checked on the driver

    def at(index: int) -> str:
        return _where(path, unit, task["first_row"], index)

    col = {name: table[source].combine_chunks() for name, source in mapping.items()}
    out = {"user": ids(col["user"], mapping["user"], at), "item": ids(col["item"], mapping["item"], at)}
    if "label" in col:
        out["label"] = labels(col["label"], mapping["label"], at)
    if "rating" in col:
        out["rating"] = pc.cast(numbers(col["rating"], mapping["rating"], at), pa.float32())
    else:  # a click log: the label is all there is to say about the behaviour
        out["rating"] = pc.cast(out["label"], pa.float32())
    out["timestamp"] = timestamps(col["timestamp"], mapping["timestamp"], at)
    return pa.table(out)


def empty_log(mapping: dict[str, str]) -> pa.Table:
    fields = [
        ("user", pa.string()),
        ("item", pa.string()),
        ("label", pa.int8()),
        ("rating", pa.float32()),
        ("timestamp", pa.int64()),
    ]
    return pa.schema([f for f in fields if f[0] != "label" or "label" in mapping]).empty_table()


def log_tasks(paths: list[str]) -> list[dict]:
    """One task per CSV file, one per Parquet row group (with the row number it starts at)."""
    tasks = []
    for path in paths:
        if _kind(path) == "csv":
            tasks.append({"path": path, "row_group": -1, "first_row": 0})
            continue
        fs, inner = _filesystem(path)
        meta = pq.ParquetFile(inner, filesystem=fs).metadata
        if meta.num_rows == 0:
            raise RawDataError(f"{path}: empty file (no rows)")
        first = 0
        for group in range(meta.num_row_groups):
            tasks.append({"path": path, "row_group": group, "first_row": first})
            first += meta.row_group(group).num_rows
    return tasks


def integer_ids(values: pa.ChunkedArray | pa.Array) -> pa.Array | pa.ChunkedArray:
    """int64 ids when every id is a number (so they sort as numbers), else the strings."""
    if pc.all(pc.match_substring_regex(values, INTEGER_ID)).as_py():
        return pc.cast(values, pa.int64())
    return values


# --------------------------------------------------------------------------- the source


class Interactions(Source):
    """The generic log + items (+ users) named by data.files."""

    name = "interactions"
    kind = "item"

    def __init__(self, files: DataFilesConfig, raw_dir: str | None):
        super().__init__(Path(raw_dir).expanduser() if raw_dir else None)
        self.files = files
        self.label_column = files.interactions.label
        self.rated = files.interactions.rating is not None
        self.log_paths = resolve_paths(files.interactions.paths, raw_dir, "interactions")
        self.item_paths = resolve_paths(files.items.paths, raw_dir, "items")
        self.user_paths = resolve_paths(files.users.paths, raw_dir, "users") if files.users.paths else []
        self.item_ids_are_int = True

    def check_files(self) -> None:
        """resolve_paths already found every file."""

    def input_files(self) -> list[Path]:
        """The local files read (their sizes and mtimes enter prepare's fingerprint); a URI's are not stat-ed."""
        return [Path(p) for p in self.log_paths + self.item_paths + self.user_paths if "://" not in p]

    def describe(self) -> str:
        return f"interactions ({len(self.log_paths)} log file(s), e.g. {self.log_paths[0]})"

    def read_log(self, blocks: int | None):
        import ray

        tasks = log_tasks(self.log_paths)
        mapping = log_columns(self.files)
        return raising_original_errors(
            ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
                lambda batch: parse_log_part(batch.to_pylist()[0], mapping), batch_size=1, batch_format="pyarrow"
            )
        )

    def finish_log(self, table: pa.Table) -> pa.Table:
        user, item = integer_ids(table["user"]), integer_ids(table["item"])
        self.item_ids_are_int = pa.types.is_integer(item.type)
        self._user_id_type = np.dtype(np.int64) if pa.types.is_integer(user.type) else np.dtype(object)
        return table.set_column(0, "user", user).set_column(1, "item", item)

    def description_parts(self) -> tuple[str, ...]:
        return text.ITEM_DESCRIPTION + tuple(f" {f.capitalize()}: {{{f}}}." for f in self.files.items.fields)

    def read_items(self, raw_ids: np.ndarray) -> pd.DataFrame:
        cfg = self.files.items
        frames = [self._item_frame(path, cfg) for path in self.item_paths]
        items = pd.concat(frames, ignore_index=True)
        first = items.drop_duplicates("raw_id")
        clash = items.merge(first[["raw_id", "title", "_where"]], on="raw_id", suffixes=("", "_first"))
        clash = clash[clash["title"] != clash["title_first"]]
        if len(clash):
            row = clash.iloc[0]
            raw = row["raw_id"].item() if isinstance(row["raw_id"], np.generic) else row["raw_id"]
            raise RawDataError(
                f"{row['_where']}: field {cfg.title!r}: item {raw!r} is titled "
                f"{row['title']!r} here but {row['title_first']!r} at {row['_where_first']}"
            )
        return first.drop(columns="_where").reset_index(drop=True)

    def _item_frame(self, path: str, cfg) -> pd.DataFrame:
        columns = list(dict.fromkeys([cfg.item, cfg.title, *([cfg.text] if cfg.text else []), *cfg.fields]))
        table, unit = _read_table(path, columns, "items")

        def at(index: int) -> str:
            return _where(path, unit, 0, index)

        raw = ids(table[cfg.item].combine_chunks(), cfg.item, at)
        if self.item_ids_are_int:
            ok = pc.match_substring_regex(raw, INTEGER_ID)
            if not pc.all(ok).as_py():
                index = _first(pc.invert(ok))
                raise RawDataError(
                    f"{at(index)}: field {cfg.item!r}: the log's item ids are numbers, "
                    f"this one is not: {raw[index].as_py()!r}"
                )
            raw = pc.cast(raw, pa.int64())
        title = table[cfg.title].combine_chunks()
        _no_empty(title, cfg.title, at)
        frame = pd.DataFrame({"raw_id": raw.to_pandas(), "title": pc.cast(title, pa.string()).to_pylist()})
        if cfg.text:
            frame["details"] = [v or "" for v in pc.cast(table[cfg.text], pa.string()).to_pylist()]
        for name in cfg.fields:
            frame[name] = self._field(table[name].combine_chunks(), cfg.list_separator)
        frame["_where"] = [at(i) for i in range(len(frame))]
        return frame

    @staticmethod
    def _field(col: pa.Array, separator: str) -> list:
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            return [[str(v) for v in values] if values else [] for values in col.to_pylist()]
        values = [None if v is None else str(v).strip() for v in col.to_pylist()]
        if any(v is not None and separator in v for v in values):  # list-valued: every row becomes a list
            return [[p.strip() for p in v.split(separator) if p.strip()] if v else [] for v in values]
        return [v or None for v in values]

    def read_users(self) -> pd.DataFrame | None:
        if not self.user_paths:
            return None
        cfg = self.files.users
        frames = []
        for path in self.user_paths:
            table, unit = _read_table(path, list(dict.fromkeys([cfg.user, *cfg.fields])), "users")
            raw = ids(
                table[cfg.user].combine_chunks(), cfg.user, lambda i, path=path, unit=unit: _where(path, unit, 0, i)
            )
            frame = pd.DataFrame({"raw_id": raw.to_pandas()})
            for name in cfg.fields:
                frame[name] = pd.array(
                    [None if v is None or str(v).strip() == "" else str(v).strip() for v in table[name].to_pylist()],
                    dtype="string",
                )
            frames.append(frame)
        users = pd.concat(frames, ignore_index=True)
        if pd.api.types.is_integer_dtype(self._user_id_type):
            ok = users["raw_id"].str.fullmatch(INTEGER_ID)
            if not ok.all():
                raise RawDataError(
                    f"{self.user_paths[0]}: user id {users['raw_id'][~ok].iloc[0]!r} is not a number, "
                    "but the log's user ids are"
                )
            users["raw_id"] = users["raw_id"].astype("int64")
        return users

    _user_id_type = np.dtype(object)

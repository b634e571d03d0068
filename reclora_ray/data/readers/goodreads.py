"""UCSD GoodReads: goodreads_interactions_*.json.gz and goodreads_books_*.json.gz (+ authors)."""

from __future__ import annotations

import dataclasses
import functools
import glob
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from reclora_ray.data.checks import LogRules, RawDataError, check_log_block, lines_from
from reclora_ray.data.readers.base import Source, json_files_dataset, json_line_chunks, parse_json_lines, to_int64

# GoodReads shelves that say where a book sits on a user's shelf, not what it is about.
NON_GENRE_SHELVES = frozenset(
    {
        "to-read",
        "currently-reading",
        "read",
        "favorites",
        "favourites",
        "owned",
        "books-i-own",
        "owned-books",
        "default",
        "library",
        "to-buy",
        "wish-list",
        "wishlist",
        "kindle",
        "ebook",
        "ebooks",
        "my-books",
        "my-library",
        "home-library",
        "i-own",
        "own",
        "audiobook",
        "audiobooks",
    }
)


GOODREADS_GENRES_PER_BOOK = 3
GOODREADS_DATE_FORMAT = "%a %b %d %H:%M:%S %z %Y"  # "Thu Dec 17 11:29:36 -0800 2015"
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
        parsed = pa.table(
            {
                "user": table["user_id"],
                "item": to_int64(table["book_id"], path, first_line, "book_id"),
                "rating": pc.cast(table["rating"], pa.float32()),
                "timestamp": pc.cast(stamps, pa.int64()),
            }
        )
        parsed = check_log_block(parsed, path, lines_from(first_line), rules, fields)
        yield parsed.filter(pc.greater(parsed["rating"], 0))  # 0 = shelved without a rating


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
        return json_files_dataset(
            self._glob("goodreads_interactions*.json.gz"),
            functools.partial(parse_goodreads_interactions, rules=self.rules),
        )

    def read_items(self, raw_ids: np.ndarray) -> pd.DataFrame:
        wanted = pa.array(raw_ids, type=pa.int64())
        frames = [_goodreads_books(str(p), wanted) for p in self._glob("goodreads_books*.json.gz")]
        books = pd.concat(frames, ignore_index=True).drop_duplicates("raw_id")
        authors_path = self.raw_dir / "goodreads_book_authors.json.gz"
        names = _goodreads_author_names(str(authors_path)) if authors_path.is_file() else {}
        books["authors"] = [[names[a] for a in ids if a in names] for ids in books.pop("author_ids")]
        return books[["raw_id", "title", "year", "genres", "authors"]]


GOODREADS_BOOK_SCHEMA = pa.schema(
    [
        ("book_id", pa.string()),
        ("title", pa.string()),
        ("publication_year", pa.string()),
        ("authors", pa.list_(pa.struct([("author_id", pa.string())]))),
        ("popular_shelves", pa.list_(pa.struct([("count", pa.string()), ("name", pa.string())]))),
    ]
)


def _goodreads_books(path: str, wanted: pa.Array) -> pd.DataFrame:
    frames = []
    for first_line, data in json_line_chunks(path):
        table = parse_json_lines(path, first_line, data, GOODREADS_BOOK_SCHEMA, required=("book_id", "title"))
        book_ids = to_int64(table["book_id"], path, first_line, "book_id")
        keep = pc.is_in(book_ids, value_set=wanted)
        table = table.filter(keep)  # only now do the kept books become Python objects
        years = pd.to_numeric(pd.Series(table["publication_year"].to_pylist(), dtype="string"), errors="coerce")
        frames.append(
            pd.DataFrame(
                {
                    "raw_id": book_ids.filter(keep).to_numpy(),
                    "title": table["title"].to_pylist(),
                    "year": years.astype("Int64"),
                    "genres": [_shelf_genres(s or []) for s in table["popular_shelves"].to_pylist()],
                    "author_ids": [
                        [a["author_id"] for a in (authors or [])] for authors in table["authors"].to_pylist()
                    ],
                }
            )
        )
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

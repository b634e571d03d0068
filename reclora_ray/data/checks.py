"""Semantic checks every log reader runs, beyond "does it parse": missing fields, the rating
range, plausible timestamps, exact duplicate rows and a label with a single class.

A reader calls `check_log_block` on each parsed block (inside its Ray task, where it still
knows the file and the line of every row), `drop_duplicates` on the gathered log and
`check_two_classes` on each split. Every error is a RawDataError naming the file, the line
(or row) and the field, so the CLI reports it in one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)


class RawDataError(ValueError):
    """A raw input that cannot be read; the message names the file, line and field."""


# 1970 .. 2100 in seconds; a larger value is almost always a millisecond timestamp.
MIN_TIMESTAMP = 1
MAX_TIMESTAMP = 4_102_444_800


@dataclass(frozen=True)
class LogRules:
    """What a valid behaviour is: ratings in [rating_min, rating_max]; timestamps in seconds
    ("ms": the file holds milliseconds, converted to seconds)."""

    rating_min: float
    rating_max: float
    timestamp_unit: Literal["s", "ms"] = "s"
    duplicates: Literal["drop", "refuse"] = "drop"


def check_log_block(
    table: pa.Table, path: str, where: Callable[[int], str], rules: LogRules, fields: dict[str, str] | None = None
) -> pa.Table:
    """The block (user, item, rating, timestamp) with timestamps in seconds, after refusing
    missing values, ratings out of range and implausible timestamps. `where(row)` names a
    block row's place in the file ("line 12", "row 3"); `fields` maps a column to the file's
    name for it."""
    fields = fields or {}

    def fail(row: int, name: str, problem: str) -> RawDataError:
        return RawDataError(f"{path}, {where(row)}: field {fields.get(name, name)!r} {problem}")

    for name in table.column_names:
        column = table[name]
        missing = column.is_null()
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            missing = pc.or_(missing, pc.equal(pc.utf8_trim_whitespace(column), ""))
        if pc.any(missing).as_py():
            raise fail(pc.index(missing, True).as_py(), name, "is missing")
    rating = table["rating"]
    bad = pc.or_(pc.less(rating, rules.rating_min), pc.greater(rating, rules.rating_max))
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        raise fail(
            row,
            "rating",
            f"is outside {rules.rating_min:g}..{rules.rating_max:g}: {rating[row].as_py():g} "
            "(data.rating_range sets the range)",
        )
    stamps = table["timestamp"]
    if rules.timestamp_unit == "ms":
        stamps = pc.divide(stamps, 1000)
        table = table.set_column(table.column_names.index("timestamp"), "timestamp", stamps)
    bad = pc.or_(pc.less(stamps, MIN_TIMESTAMP), pc.greater(stamps, MAX_TIMESTAMP))
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        value = stamps[row].as_py()
        if rules.timestamp_unit == "s" and MIN_TIMESTAMP <= value // 1000 <= MAX_TIMESTAMP:
            raise fail(
                row,
                "timestamp",
                f"looks like milliseconds, not seconds: {value} (set data.timestamp_unit=ms to convert them)",
            )
        raise fail(row, "timestamp", f"is not a time between 1970 and 2100 in seconds: {value}")
    return table


def drop_duplicates(
    columns: dict[str, np.ndarray], rules: LogRules, where: str, describe: Callable[[int], str]
) -> tuple[np.ndarray | None, int]:
    """(mask of the rows to keep, or None when there is nothing to drop; how many rows repeat
    an earlier row exactly). With rules.duplicates == "refuse", the first repeat is an error;
    `describe(row)` names that row for it."""
    keys = list(columns.values())
    order = np.lexsort(keys[::-1])
    same = np.ones(len(order) - 1, dtype=bool) if len(order) > 1 else np.zeros(0, dtype=bool)
    for values in keys:
        ordered = values[order]
        same &= ordered[1:] == ordered[:-1]
    repeats = order[1:][same]
    if len(repeats) == 0:
        return None, 0
    if rules.duplicates == "refuse":
        raise RawDataError(
            f"{where}: {len(repeats)} rows repeat an earlier row exactly, e.g. {describe(int(repeats[0]))} "
            "(data.duplicates=drop drops and counts them)"
        )
    keep = np.ones(len(order), dtype=bool)
    keep[repeats] = False
    return keep, len(repeats)


def check_two_classes(labels: np.ndarray, what: str, rule: str, policy: Literal["refuse", "warn"] = "refuse") -> None:
    """Refuse (or log) a label column, a split's, with one class: AUC is undefined on it."""
    positives = int(np.count_nonzero(labels))
    if positives in (0, len(labels)):
        message = (
            f"{what}: every label is {int(positives > 0)} ({positives} positive of {len(labels)} samples, "
            f"label rule {rule}); AUC is undefined: check the ratings or data.label_threshold"
        )
        if policy == "refuse":
            raise RawDataError(message + " (data.single_class=warn accepts it)")
        log.warning("%s", message)


def lines_from(first_line: int) -> Callable[[int], str]:
    """`where` for a block whose rows are consecutive lines from `first_line`."""
    return lambda row: f"line {first_line + row}"


def rows_from_one(row: int) -> str:
    """`where` for a table without lines (parquet)."""
    return f"row {row + 1}"

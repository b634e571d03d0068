"""Catalogue ids: the raw user and item ids of the logs, as people and other systems know them.

The prepared data numbers users and items densely (user_id, item_id); every interface a person
or another system meets (the service, the adapter export, predictions, the report) speaks the
catalogue's ids (users.parquet / items.parquet `raw_id`). An id is matched by its text, so the
JSON number 50 and the string "50" name the same item. A cold-start item is in the items table
but in no user's sequence (data.cold_items): it is scored from its text alone.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from reclora_ray.data.prepared import PreparedData


class UnknownIds(KeyError):
    """Catalogue ids that are not in the prepared data; `ids` lists them in request order."""

    def __init__(self, what: str, ids: list):
        super().__init__(f"unknown item ids in {what}: {ids}")
        self.what, self.ids = what, ids

    def __str__(self) -> str:
        return self.args[0]


def python_id(value):
    """A raw id as JSON writes it: numpy ints become int."""
    return value.item() if isinstance(value, np.generic) else value


class Catalogue:
    def __init__(self, items: pd.DataFrame, users: pd.DataFrame, item_counts: np.ndarray):
        self.item_raw = np.array([python_id(v) for v in items["raw_id"]], dtype=object)
        self.user_raw = np.array([python_id(v) for v in users["raw_id"]], dtype=object)
        self._items = {str(raw): i for i, raw in enumerate(self.item_raw)}
        self._users = {str(raw): u for u, raw in enumerate(self.user_raw)}
        self.cold_items = item_counts == 0

    @classmethod
    def from_prepared(cls, data: PreparedData) -> "Catalogue":
        counts = np.bincount(data.sequences.item_ids, minlength=data.n_items)
        return cls(data.items, data.users, counts)

    def items(self, raw_ids, what: str = "items") -> np.ndarray:
        """Dense item ids of catalogue ids; UnknownIds names every id not in the items table."""
        dense = [self._items.get(str(raw), -1) for raw in raw_ids]
        unknown = list(dict.fromkeys(raw for raw, d in zip(raw_ids, dense) if d < 0))
        if unknown:
            raise UnknownIds(what, unknown)
        return np.asarray(dense, dtype=np.int64)

    def user(self, raw_id) -> int | None:
        """The dense id of a catalogue user id, None for a user the prepared data does not know."""
        return self._users.get(str(raw_id))


@functools.lru_cache(maxsize=8)
def _raw_id_lookup(path: str, mtime_ns: int, kind: str) -> pd.Series:
    """dense id -> raw id of users.parquet / items.parquet, read once per process and file version
    (a scoring worker adds raw ids to every block it writes)."""
    return pd.read_parquet(path, columns=[f"{kind}_id", "raw_id"]).set_index(f"{kind}_id")["raw_id"]


def add_catalogue_ids(frame: pd.DataFrame, data_dir) -> pd.DataFrame:
    """user_raw_id / item_raw_id beside the dense user_id / item_id of `frame` (e.g. predictions)."""
    from pathlib import Path

    for kind in ("user", "item"):
        path = Path(data_dir) / f"{kind}s.parquet"
        lookup = _raw_id_lookup(str(path.resolve()), path.stat().st_mtime_ns, kind)
        frame.insert(
            frame.columns.get_loc(f"{kind}_id") + 1,
            f"{kind}_raw_id",
            lookup.reindex(frame[f"{kind}_id"].to_numpy()).to_numpy(),
        )
    return frame


def example_rows(data_dir, predictions: pd.DataFrame, n: int = 6) -> str:
    """A markdown table of a few scored test samples by catalogue id and title: the highest and
    lowest P(yes) of the model, so a reader can check them against the catalogue."""
    from pathlib import Path

    ranked = predictions.sort_values("p_yes", ascending=False, kind="stable")
    picked = pd.concat([ranked.head(n - n // 2), ranked.tail(n // 2)]).drop_duplicates("sample_id")
    picked = add_catalogue_ids(picked[["sample_id", "user_id", "item_id", "label", "p_yes"]].copy(), data_dir)
    titles = pd.read_parquet(Path(data_dir) / "items.parquet", columns=["item_id", "title"]).set_index("item_id")[
        "title"
    ]
    lines = ["| user | item | title | label | P(yes) |", "|---|---|---|---|---|"]
    for row in picked.itertuples():
        title = str(titles[row.item_id]).replace("|", "\\|")
        lines.append(f"| {row.user_raw_id} | {row.item_raw_id} | {title} | {row.label} | {row.p_yes:.3f} |")
    return "\n".join(lines)

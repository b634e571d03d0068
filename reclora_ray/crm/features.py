"""ID features for the CRMs: which fields exist, their vocabularies, and how raw ids become a batch.

Every model takes the same batch dict (all int64 codes, 0 = padding / unknown):
  user (B,)            user_id + 1
  item (B,)            target item_id + 1
  context (B, 2)       hour of day + 1, weekday + 1 (from the unix timestamp, UTC)
  hist_item (B, K)     history item_id + 1, 0 where the history is shorter than K (left padded)
  hist_rating (B, K)   rating bucket round(2 * rating) + 1 of each history behaviour, 0 = padding
Profile and item attributes are not in the batch: the model holds them as lookup tables
(`build_features`), so the same call works for training rows, tuning samples and ad-hoc serve
requests, and a batch carries only ids.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from reclora_ray.config import ConfigError, CRMConfig
from reclora_ray.data.prepared import PreparedData

CONTEXT_FIELDS = {"hour": 25, "weekday": 8}
RATING_BUCKETS = 12  # round(2 * rating) in 0..10 (half stars up to 5), + 1; 0 = padding
NON_FEATURE_USER_COLUMNS = ("user_id", "raw_id", "profile_text")
DEFAULT_ITEM_FIELDS = ("year", "genres")


@dataclass
class FeatureSpec:
    """Everything a model needs to size its embeddings; saved in crm.json."""

    dataset: str
    n_users: int
    n_items: int
    user_fields: dict[str, int]  # name -> vocabulary size incl. code 0; user_id first (if crm.user_id)
    item_fields: dict[str, int]  # scalar item fields; item_id first
    item_bags: dict[str, list[int]]  # multi-valued item fields: name -> [vocabulary size, max length]
    history: str  # "long" (retrieved hist_long) or "recent"
    history_len: int
    context_fields: dict[str, int] = field(default_factory=lambda: dict(CONTEXT_FIELDS))
    rating_buckets: int = RATING_BUCKETS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> "FeatureSpec":
        return cls(**payload)


def build_features(
    prepared: PreparedData, crm: CRMConfig, history_len: int
) -> tuple[FeatureSpec, dict[str, np.ndarray]]:
    """The field vocabularies of a prepared dataset and the lookup tables the model embeds.

    Tables (row 0 = unknown / padding):
      user_table (n_users + 1, n_user_fields)      codes of user_id (if crm.user_id) and each profile field
      item_table (n_items + 1, n_item_fields)      codes of item_id and each scalar item field
      bag_<name> (n_items + 1, max length)         codes of a list field (e.g. genres), 0 padded
    """
    users, items = prepared.users, prepared.items
    user_names = _choose_fields(
        crm.user_fields,
        [c for c in users.columns if c not in NON_FEATURE_USER_COLUMNS],
        users.columns,
        "crm.user_fields",
        prepared.root / "users.parquet",
    )
    item_names = _choose_fields(
        crm.item_fields,
        prepared.meta.get("item_features") or [c for c in DEFAULT_ITEM_FIELDS if c in items.columns],
        items.columns,
        "crm.item_fields",
        prepared.root / "items.parquet",
    )

    user_fields: dict[str, int] = {}
    user_columns = []
    if crm.user_id:
        user_fields["user_id"] = prepared.n_users + 1
        user_columns.append(np.arange(prepared.n_users, dtype=np.int64) + 1)
    elif not user_names:
        raise ConfigError(
            f"crm.user_id is false and no profile field is chosen (crm.user_fields, "
            f"{prepared.root / 'users.parquet'}): the model would know nothing of the user"
        )
    for name in user_names:
        codes, size = _categorical_codes(users[name])
        user_fields[name] = size
        user_columns.append(codes)

    item_fields = {"item_id": prepared.n_items + 1}
    item_columns = [np.arange(prepared.n_items, dtype=np.int64) + 1]
    item_bags: dict[str, list[int]] = {}
    tables: dict[str, np.ndarray] = {}
    for name in item_names:
        if _is_list_column(items[name]):
            codes, size = _bag_codes(items[name])
            item_bags[name] = [size, codes.shape[1]]
            tables[f"bag_{name}"] = _with_unknown_row(codes)
        else:
            codes, size = _categorical_codes(items[name])
            item_fields[name] = size
            item_columns.append(codes)

    tables["user_table"] = _with_unknown_row(np.stack(user_columns, axis=1))
    tables["item_table"] = _with_unknown_row(np.stack(item_columns, axis=1))
    spec = FeatureSpec(
        dataset=prepared.dataset,
        n_users=prepared.n_users,
        n_items=prepared.n_items,
        user_fields=user_fields,
        item_fields=item_fields,
        item_bags=item_bags,
        history=crm.history,
        history_len=history_len,
    )
    return spec, tables


class FeatureEncoder:
    """Raw ids, timestamps and histories -> the batch dict every CRM takes (module docstring)."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec

    def encode(self, user_ids, item_ids, timestamps, hist_item_ids, hist_ratings) -> dict[str, np.ndarray]:
        """user_ids, item_ids, timestamps: (B,); hist_item_ids (B, K) with -1 padding, hist_ratings
        (B, K). Histories are chronological; longer than the model's K keeps the most recent."""
        hist_item_ids = _fit_history(np.asarray(hist_item_ids), self.spec.history_len, fill=-1)
        hist_ratings = _fit_history(np.asarray(hist_ratings, dtype=np.float32), self.spec.history_len, fill=0)
        hist_item = _id_codes(hist_item_ids, self.spec.n_items)
        buckets = np.clip(np.rint(hist_ratings * 2), 0, RATING_BUCKETS - 2).astype(np.int64) + 1
        timestamps = np.asarray(timestamps, dtype=np.int64)
        hour = (timestamps // 3600) % 24 + 1
        weekday = (timestamps // 86400 + 3) % 7 + 1  # 1970-01-01 was a Thursday; Monday = 1
        return {
            "user": _id_codes(np.asarray(user_ids), self.spec.n_users),
            "item": _id_codes(np.asarray(item_ids), self.spec.n_items),
            "context": np.stack([hour, weekday], axis=1),
            "hist_item": hist_item,
            "hist_rating": np.where(hist_item > 0, buckets, 0),
        }


def _choose_fields(requested, default, available, key: str, path) -> list[str]:
    if requested is None:
        return list(default)
    unknown = [name for name in requested if name not in available or name in ("user_id", "item_id")]
    if unknown:
        raise ConfigError(
            f"{key}: {unknown} not usable fields of {path} (columns: {sorted(available)}; ids are set by crm.user_id / always used)"
        )
    return list(requested)


def _is_list_column(column: pd.Series) -> bool:
    values = column.dropna()
    return len(values) > 0 and isinstance(values.iloc[0], (list, tuple, np.ndarray))


def _categorical_codes(column: pd.Series) -> tuple[np.ndarray, int]:
    """Codes 1..n for the sorted distinct values (as strings), 0 for null."""
    as_text = column.astype("string")
    vocab = np.sort(as_text.dropna().unique().astype(str))
    codes = np.zeros(len(column), dtype=np.int64)
    present = as_text.notna().to_numpy()
    codes[present] = np.searchsorted(vocab, as_text[present].to_numpy(dtype=str)) + 1
    return codes, len(vocab) + 1


def _bag_codes(column: pd.Series) -> tuple[np.ndarray, int]:
    """A (n, max length) code matrix for a list column, 0 padded."""
    lists = [[] if v is None or (isinstance(v, float) and np.isnan(v)) else [str(x) for x in v] for v in column]
    vocab = np.sort(np.unique([x for values in lists for x in values]).astype(str))
    width = max(1, max(len(values) for values in lists))
    codes = np.zeros((len(lists), width), dtype=np.int64)
    for row, values in enumerate(lists):
        if values:
            codes[row, : len(values)] = np.searchsorted(vocab, values) + 1
    return codes, len(vocab) + 1


def _with_unknown_row(table: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((1, table.shape[1]), dtype=np.int64), table.astype(np.int64)])


def _id_codes(ids: np.ndarray, n: int) -> np.ndarray:
    """Dense id -> id + 1; negative (padding) or out-of-vocabulary ids -> 0."""
    ids = ids.astype(np.int64)
    return np.where((ids >= 0) & (ids < n), ids + 1, 0)


def _fit_history(values: np.ndarray, k: int, fill) -> np.ndarray:
    """Keep the last k columns, or left-pad to k."""
    if values.ndim != 2:
        raise ValueError(f"histories must be 2-D (batch, length), got shape {values.shape}")
    if values.shape[1] >= k:
        return values[:, values.shape[1] - k :]
    pad = np.full((values.shape[0], k - values.shape[1]), fill, dtype=values.dtype)
    return np.concatenate([pad, values], axis=1)

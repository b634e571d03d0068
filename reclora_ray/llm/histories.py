"""The short (text) and long (ID) histories of a batch of samples, as item ids and ratings.

Tuning, batch scoring and serving all hand the model a `Histories`, so a sample gets the same
prompt and the same R_c whichever path scores it. Batch paths build it from sequence indices
(retrieved, or the recent K); the online service from a request's own behaviours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from reclora_ray.data.prepared import Sequences
from reclora_ray.retrieval.history import history_indices
from reclora_ray.rundir import RunDir
from reclora_ray.variants import Variant


@dataclass
class Histories:
    """Chronological, left-padded with item -1 / rating 0 to a fixed K per list."""

    short_items: np.ndarray  # (B, k_short) int64: the prompt's history
    short_ratings: np.ndarray  # (B, k_short) float32
    long_items: Optional[np.ndarray] = None  # (B, k_long) int64: what the CRM reads; None without a gate
    long_ratings: Optional[np.ndarray] = None

    def take(self, index: np.ndarray) -> "Histories":
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Histories(
            pick(self.short_items), pick(self.short_ratings), pick(self.long_items), pick(self.long_ratings)
        )


def history_indices_of(rows: pd.DataFrame, mode: str, k: int, column: str) -> np.ndarray:
    """(B, k) indices into each user's sequence for prepared samples (columns pos[, `column`]):
    the retrieved `column` or the last k before pos (`retrieval.history.history_indices`)."""
    if mode not in ("semantic", "recent"):
        raise ValueError(f"unknown history mode {mode!r}; expected 'semantic' or 'recent'")
    retrieved = None
    if mode == "semantic":
        if column not in rows:
            raise ValueError(
                f"semantic histories need the retrieval output column {column!r}; run `reclora retrieve` first"
            )
        retrieved = np.stack(rows[column].to_numpy())
    try:
        return history_indices(rows["pos"].to_numpy(), k, retrieved)
    except ValueError as err:
        raise ValueError(f"{column}: {err}; re-run `reclora retrieve --overwrite` with this config") from None


def sample_histories(
    sequences: Sequences, rows: pd.DataFrame, variant: Variant, k_short: int, k_long: int
) -> Histories:
    """The histories `variant` reads for prepared samples (columns user_id, pos[, hist_short, hist_long])."""
    users = rows["user_id"].to_numpy()

    def gather(indices):
        return (
            sequences.gather(users, indices, "item_ids").astype(np.int64),
            sequences.gather(users, indices, "ratings").astype(np.float32),
        )

    short = gather(history_indices_of(rows, variant.short_mode, k_short, "hist_short"))
    long = (
        gather(history_indices_of(rows, variant.long_mode, k_long, "hist_long")) if variant.uses_crm else (None, None)
    )
    return Histories(*short, *long)


def load_samples(run: RunDir | Path, split: str, variant: Variant) -> pd.DataFrame:
    """A split's samples, with the retrieved hist_long / hist_short columns when the variant reads
    them. `run`: the run directory (or its OUT/data, whose run directory is its parent)."""
    run = run if isinstance(run, RunDir) else RunDir(Path(run).parent)  # OUT/data -> OUT
    samples = pd.read_parquet(run.data / "samples" / f"{split}.parquet")
    if not variant.needs_retrieval:
        return samples
    from reclora_ray.retrieval.retrieve import load_retrieval

    retrieval = load_retrieval(run, split)
    if not np.array_equal(retrieval.sample_id, samples["sample_id"].to_numpy()):
        raise ValueError(
            f"the retrieval output for {split} does not match {run.data}/samples/{split}.parquet; "
            "re-run `reclora retrieve --overwrite`"
        )
    return samples.assign(hist_long=list(retrieval.hist_long), hist_short=list(retrieval.hist_short))


def fixed_subsample(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """n rows drawn uniformly without replacement, fixed by the seed, in their original order
    (the whole frame when n is None or exceeds it): the few-shot set, the LLMs' test samples."""
    if n is None or n >= len(frame):
        return frame.reset_index(drop=True)
    keep = np.sort(np.random.default_rng(seed).choice(len(frame), size=n, replace=False))
    return frame.iloc[keep].reset_index(drop=True)

import numpy as np
import pandas as pd
import pytest

from reclora_ray.data.prepared import Sequences
from reclora_ray.llm.histories import sample_histories
from reclora_ray.variants import get_variant


@pytest.fixture
def sequences():
    # user 0: items 10..14 rated 1..5; user 1: items 20, 21
    return Sequences(
        offsets=np.array([0, 5, 7]),
        item_ids=np.array([10, 11, 12, 13, 14, 20, 21], dtype=np.int32),
        ratings=np.array([1, 2, 3, 4, 5, 5, 4], dtype=np.float32),
        labels=np.array([0, 0, 0, 1, 1, 1, 1], dtype=np.int8),
        timestamps=np.arange(7, dtype=np.int64),
    )


def rows(**columns):
    return pd.DataFrame(columns)


def test_recent_takes_last_k_before_pos(sequences):
    hist = sample_histories(
        sequences, rows(user_id=[0, 1, 0], pos=[4, 1, 0]), get_variant("tallrec"), k_short=3, k_long=2
    )
    assert hist.short_items.tolist() == [[11, 12, 13], [-1, -1, 20], [-1, -1, -1]]
    assert hist.short_ratings.tolist() == [[2, 3, 4], [0, 0, 5], [0, 0, 0]]
    assert hist.long_items is None  # TALLRec has no gate, so no CRM history


def test_semantic_reads_the_retrieved_indices(sequences):
    samples = rows(
        user_id=[0, 1],
        pos=[5, 2],
        hist_short=[np.array([0, 2, 4]), np.array([-1, -1, 1])],
        hist_long=[np.array([3, 4]), np.array([0, 1])],
    )
    hist = sample_histories(sequences, samples, get_variant("reclora"), k_short=3, k_long=2)
    assert hist.short_items.tolist() == [[10, 12, 14], [-1, -1, 21]]
    assert hist.long_items.tolist() == [[13, 14], [20, 21]]
    assert hist.long_ratings.tolist() == [[4, 5], [5, 4]]


def test_ablation_mixes_modes(sequences):
    samples = rows(user_id=[0], pos=[5], hist_short=[np.array([0, 1])], hist_long=[np.array([0, 1])])
    hist = sample_histories(sequences, samples, get_variant("wo-long-retriever"), k_short=2, k_long=2)
    assert hist.short_items.tolist() == [[10, 11]]  # retrieved
    assert hist.long_items.tolist() == [[13, 14]]  # recent


def test_missing_or_mis_sized_retrieval_is_a_clear_error(sequences):
    with pytest.raises(ValueError, match="reclora retrieve"):
        sample_histories(sequences, rows(user_id=[0], pos=[1]), get_variant("rella"), k_short=2, k_long=2)
    samples = rows(user_id=[0], pos=[5], hist_short=[np.array([0, 1, 2])])
    with pytest.raises(ValueError, match="re-run `reclora retrieve --overwrite`"):
        sample_histories(sequences, samples, get_variant("rella"), k_short=2, k_long=2)

import numpy as np
import pytest

from reclora_ray.data.prepared import Sequences
from reclora_ray.llm.histories import history_batch, pad_index_lists


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


def test_recent_takes_last_k_before_pos(sequences):
    batch = history_batch(sequences, np.array([0, 1, 0]), np.array([4, 1, 0]), k=3, mode="recent")
    assert batch.item_ids.tolist() == [[11, 12, 13], [-1, -1, 20], [-1, -1, -1]]
    assert batch.ratings.tolist() == [[2, 3, 4], [0, 0, 5], [0, 0, 0]]
    assert batch.row(1) == ([20], [5.0])


def test_semantic_uses_retrieved_indices_in_given_order(sequences):
    batch = history_batch(sequences, np.array([0, 1]), np.array([5, 2]), k=3, mode="semantic",
                          retrieved=[[0, 2, 4], [1]])
    assert batch.item_ids.tolist() == [[10, 12, 14], [-1, -1, 21]]


def test_pad_keeps_the_latest_when_too_long():
    assert pad_index_lists([[0, 1, 2, 3], []], 2).tolist() == [[2, 3], [-1, -1]]


def test_semantic_without_retrieval_is_a_clear_error(sequences):
    with pytest.raises(ValueError, match="reclora retrieve"):
        history_batch(sequences, np.array([0]), np.array([1]), k=2, mode="semantic")
    with pytest.raises(ValueError, match="unknown history mode"):
        history_batch(sequences, np.array([0]), np.array([1]), k=2, mode="random")

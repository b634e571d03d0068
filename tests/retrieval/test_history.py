import numpy as np
import pyarrow as pa
import pytest

from reclora_ray.data.prepared import Sequences
from reclora_ray.retrieval.history import HistoryRetriever, history_indices, lists_to_padded, padded_to_lists


def random_log(seed, n_users=30, n_items=400, max_len=250, d=8, integer=False):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, n_users)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    seq_items = rng.integers(0, n_items, offsets[-1]).astype(np.int32)  # repeats allowed: ties
    if integer:  # small integer vectors: exact dot products, many exact ties
        emb = rng.integers(-1, 2, (n_items, d)).astype(np.float32)
    else:
        emb = rng.standard_normal((n_items, d)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    n = 2000
    users = rng.integers(0, n_users, n)
    pos = rng.integers(0, lengths[users] + 1)
    targets = rng.integers(0, n_items, n)
    return offsets, seq_items, emb, users, targets, pos


def brute_force(offsets, seq_items, emb, user, target, pos, k):
    """Sort the whole past by (similarity desc, recency desc), keep k, return chronologically."""
    history = seq_items[offsets[user] : offsets[user] + pos]
    sims = np.array([np.dot(emb[i], emb[target]) for i in history], dtype=np.float32)
    ranked = np.lexsort((-np.arange(pos), -sims))
    return np.sort(ranked[:k])


def unpadded(row):
    return row[row >= 0]


@pytest.mark.parametrize("integer", [False, True], ids=["random-unit", "integer-ties"])
def test_semantic_matches_brute_force(integer):
    offsets, seq_items, emb, users, targets, pos = random_log(1, integer=integer)
    retriever = HistoryRetriever(offsets, seq_items, emb, k_long=25, k_short=4, max_block=700)
    hist_long, hist_short = retriever.retrieve(users, targets, pos)
    for i in range(len(users)):
        for out, k in ((hist_long, 25), (hist_short, 4)):
            expected = brute_force(offsets, seq_items, emb, users[i], targets[i], pos[i], k)
            np.testing.assert_array_equal(unpadded(out[i]), expected, err_msg=f"sample {i}, k={k}")


def test_short_longer_than_long_and_chunking_agree():
    offsets, seq_items, emb, users, targets, pos = random_log(2)
    small_blocks = HistoryRetriever(offsets, seq_items, emb, k_long=5, k_short=12, max_block=50)
    big_blocks = HistoryRetriever(offsets, seq_items, emb, k_long=5, k_short=12, max_block=1 << 24)
    for a, b in zip(small_blocks.retrieve(users, targets, pos), big_blocks.retrieve(users, targets, pos)):
        np.testing.assert_array_equal(a, b)
    hist_long, hist_short = big_blocks.retrieve(users, targets, pos)
    for i in range(0, len(users), 7):
        np.testing.assert_array_equal(
            unpadded(hist_short[i]), brute_force(offsets, seq_items, emb, users[i], targets[i], pos[i], 12)
        )


def test_only_strict_past_chronological_and_complete():
    offsets, seq_items, emb, users, targets, pos = random_log(3)
    # The target item is also in the history at every position: it must never reach into pos.
    targets = seq_items[offsets[users] + np.minimum(pos, offsets[users + 1] - offsets[users] - 1)]
    hist_long, hist_short = HistoryRetriever(offsets, seq_items, emb, k_long=20, k_short=3).retrieve(
        users, targets, pos
    )
    for out, k in ((hist_long, 20), (hist_short, 3)):
        counts = (out >= 0).sum(1)
        np.testing.assert_array_equal(counts, np.minimum(pos, k))
        assert np.all(out < pos[:, None])
        for row in out:
            kept = unpadded(row)
            assert np.all(np.diff(kept) > 0)
            assert np.all(row[: k - len(kept)] == -1)  # left padding, like Sequences.recent
    few = pos <= 3
    np.testing.assert_array_equal(
        hist_short[few], np.where(np.arange(-3, 0) + pos[few, None] >= 0, np.arange(-3, 0) + pos[few, None], -1)
    )


def test_recent_mode_is_sequences_recent():
    offsets, seq_items, emb, users, targets, pos = random_log(4)
    sequences = Sequences(
        offsets,
        seq_items,
        np.zeros(len(seq_items), np.float32),
        np.zeros(len(seq_items), np.int8),
        np.zeros(len(seq_items), np.int64),
    )
    retriever = HistoryRetriever(
        offsets, seq_items, None, k_long=30, k_short=6, long_mode="recent", short_mode="recent"
    )
    hist_long, hist_short = retriever.retrieve(users, targets, pos)
    np.testing.assert_array_equal(hist_long, sequences.recent(users, pos, 30))
    np.testing.assert_array_equal(hist_short, sequences.recent(users, pos, 6))


def test_modes_are_independent():
    offsets, seq_items, emb, users, targets, pos = random_log(5)
    both = HistoryRetriever(offsets, seq_items, emb, k_long=30, k_short=6).retrieve(users, targets, pos)
    mixed = HistoryRetriever(offsets, seq_items, emb, k_long=30, k_short=6, long_mode="recent").retrieve(
        users, targets, pos
    )
    recent = HistoryRetriever(
        offsets, seq_items, None, k_long=30, k_short=6, long_mode="recent", short_mode="recent"
    ).retrieve(users, targets, pos)
    np.testing.assert_array_equal(mixed[0], recent[0])
    np.testing.assert_array_equal(mixed[1], both[1])
    assert not np.array_equal(both[0], recent[0])


def test_bad_input():
    offsets, seq_items, emb, users, targets, pos = random_log(6)
    with pytest.raises(ValueError, match="needs item embeddings"):
        HistoryRetriever(offsets, seq_items, None, k_long=3, k_short=2)
    retriever = HistoryRetriever(offsets, seq_items, emb, k_long=3, k_short=2)
    too_far = pos.copy()
    too_far[5] = offsets[users[5] + 1] - offsets[users[5]] + 1
    with pytest.raises(ValueError, match="sample 5: pos"):
        retriever.retrieve(users, targets, too_far)


def test_list_round_trip():
    padded = np.array([[-1, -1, 3], [0, 1, 2], [-1, -1, -1]], dtype=np.int32)
    column = padded_to_lists(padded)
    assert column.to_pylist() == [[3], [0, 1, 2], []]
    np.testing.assert_array_equal(lists_to_padded(column, 3), padded)
    with pytest.raises(ValueError, match="more than k=2"):
        lists_to_padded(column, 2)


def test_history_indices_is_one_rule_for_lists_matrices_and_recent():
    lists = pa.array([[1, 2, 3], [], [7], [8, 9]], type=pa.list_(pa.int32()))
    padded = [[1, 2, 3], [-1, -1, -1], [-1, -1, 7], [-1, 8, 9]]
    assert history_indices(np.array([5, 0, 9, 10]), 3, lists).tolist() == padded  # the CRM's row ranges
    assert history_indices(np.array([9, 10]), 2, lists.slice(2)).tolist() == [
        [-1, 7],
        [8, 9],
    ]  # a slice keeps its offsets
    assert history_indices(np.array([5, 0, 9, 10]), 3, np.array(padded)).tolist() == padded  # the LLM's joined columns
    recent = history_indices(np.array([5, 0, 2]), 3)  # no retrieved histories: the last k before pos
    assert recent.tolist() == [[2, 3, 4], [-1, -1, -1], [-1, 0, 1]] and recent.dtype == np.int64
    with pytest.raises(ValueError, match="hold 3 behaviours per sample, the config asks for 2"):
        history_indices(np.array([5]), 2, np.array([[1, 2, 3]]))
    with pytest.raises(ValueError, match="more than k=2"):
        history_indices(np.array([5]), 2, lists[:1])

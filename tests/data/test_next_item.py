"""The next-item task's candidate sets: on synthetic arrays and on the prepared ML-100K."""

import numpy as np
import pytest

from reclora_ray.config import NextItemDataConfig
from reclora_ray.data.next_item import CandidateSamplingError, candidate_sets, interaction_keys
from reclora_ray.data.prepared import SPLITS, PreparedData


def _log(n_users=30, n_items=60, per_user=40, seed=0):
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(n_users), per_user)
    item = np.concatenate([rng.choice(n_items, size=per_user, replace=False) for _ in range(n_users)])
    return user, item


def test_candidates_hold_the_target_once_and_only_unseen_negatives():
    n_items = 60
    user, item = _log(n_items=n_items)  # each user saw 40 of 60 items: negatives are often rejected
    keys = interaction_keys(user, item, n_items)
    cand, target_index = candidate_sets(user, item, keys, n_items, 20, np.random.default_rng(1))
    assert cand.shape == (len(user), 20)
    assert np.array_equal(cand[np.arange(len(user)), target_index], item)
    seen = [set(item[user == u]) for u in range(user.max() + 1)]
    for row, u, t in zip(cand, user, item):
        assert len(set(row)) == 20 and (row == t).sum() == 1
        assert not (set(row) - {t}) & seen[u]
    assert len(np.unique(target_index)) > 10  # the target's place is shuffled


def test_candidates_are_deterministic_by_seed():
    user, item = _log()
    keys = interaction_keys(user, item, 60)
    a = candidate_sets(user, item, keys, 60, 20, np.random.default_rng(7))
    b = candidate_sets(user, item, keys, 60, 20, np.random.default_rng(7))
    c = candidate_sets(user, item, keys, 60, 20, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_a_user_who_saw_almost_everything_is_named():
    user, item = _log(n_users=3, n_items=50, per_user=45)
    with pytest.raises(CandidateSamplingError, match="user 0 interacted with 45 of 50 items"):
        candidate_sets(user, item, interaction_keys(user, item, 50), 50, 20, np.random.default_rng(0))


@pytest.mark.ray
def test_prepared_next_item_splits_follow_the_ctr_split(ml100k):
    data = PreparedData.load(ml100k)
    cfg = NextItemDataConfig()
    assert data.meta["next_item"]["candidates"] == cfg.candidates
    seq = data.sequences
    for split in SPLITS:
        rows, cand = data.next_item(split)
        samples = data.samples(split).set_index("sample_id")
        assert len(rows) == data.meta["next_item"]["rows"][split] > 0
        # Targets are the split's CTR behaviours with at least one earlier behaviour.
        assert set(rows["sample_id"]) <= set(samples.index) and (rows["pos"] >= 1).all()
        assert np.array_equal(samples.loc[rows["sample_id"], "item_id"].to_numpy(), rows["item_id"].to_numpy())
        assert np.array_equal(cand[np.arange(len(rows)), rows["target_index"]], rows["item_id"])
        users = rows["user_id"].to_numpy()
        for u, row, target in zip(users[:300], cand[:300], rows["item_id"][:300]):
            whole = set(seq.item_ids[seq.offsets[u] : seq.offsets[u + 1]])
            assert len(set(row)) == cfg.candidates and (set(row) - {target}).isdisjoint(whole)
    # Every valid-split behaviour with history is a target (no subsample at this size).
    valid = data.samples("valid")
    assert len(data.next_item("valid")[0]) == int((valid["pos"] >= 1).sum())

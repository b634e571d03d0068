"""The packaged ML-100K through the whole protocol: counts, split, history order, labels, reruns."""

import json

import numpy as np
import pandas as pd
import pytest

from reclora_ray.data.prepare import prepare_dataset
from reclora_ray.data.prepared import SPLITS, PreparedData
from reclora_ray.rundir import StageOutputExists

pytestmark = pytest.mark.ray


def test_counts_match_the_paper_protocol(ml100k):
    data = PreparedData.load(ml100k, expect_dataset="ml-100k")
    meta = data.meta
    assert (meta["n_rows"], data.n_users, data.n_items) == (99_287, 943, 1_349)
    assert [meta["splits"][s]["rows"] for s in SPLITS] == [79_429, 9_929, 9_929]
    assert [len(data.samples(s)) for s in SPLITS] == [79_429, 9_929, 9_929]
    assert len(data.sequences.item_ids) == 99_287
    assert meta["label_rule"] == "rating >= 4" and meta["k_core"] == 5 and meta["timestamp_field"] == "timestamp"
    assert meta["user_fields"] == ["gender", "age", "occupation", "zip"]
    assert meta["item_fields"] == ["title", "year", "genres"]
    assert meta["test_subsample"] is None


def test_every_user_and_item_keeps_five_behaviours(ml100k):
    data = PreparedData.load(ml100k)
    assert data.sequences.length(np.arange(data.n_users)).min() >= 5
    assert np.bincount(data.sequences.item_ids, minlength=data.n_items).min() >= 5


def test_samples_follow_global_time_and_histories_are_strictly_earlier(ml100k):
    data = PreparedData.load(ml100k)
    samples = pd.concat([data.samples(s) for s in SPLITS], ignore_index=True)
    assert np.array_equal(samples["sample_id"], np.arange(len(samples)))
    # Global order: timestamp, then user (dense ids follow raw ids), then item.
    key = samples[["timestamp", "user_id", "item_id"]].to_numpy()
    assert (np.diff(key[:, 0]) >= 0).all()
    assert (np.lexsort(key.T[::-1]) == np.arange(len(key))).all()
    # A split boundary never goes back in time.
    last = [data.samples(s)["timestamp"].max() for s in SPLITS]
    first = [data.samples(s)["timestamp"].min() for s in SPLITS]
    assert last[0] <= first[1] and last[1] <= first[2]

    seq, users, pos = data.sequences, samples["user_id"].to_numpy(), samples["pos"].to_numpy()
    at = seq.offsets[users] + pos
    assert np.array_equal(seq.item_ids[at], samples["item_id"])
    assert np.array_equal(seq.timestamps[at], samples["timestamp"])
    # Within each user's sequence (timestamp, item) strictly increases, so every history
    # behaviour (index < pos) precedes its sample in the global order.
    same_user = np.repeat(np.arange(data.n_users), np.diff(seq.offsets))
    step = np.flatnonzero(same_user[1:] == same_user[:-1])
    earlier_ts, later_ts = seq.timestamps[step], seq.timestamps[step + 1]
    tie = earlier_ts == later_ts
    assert (earlier_ts <= later_ts).all()
    assert (seq.item_ids[step][tie] < seq.item_ids[step + 1][tie]).all()
    history_end = data.sequences.recent(users, pos, 1)[:, 0]
    has_history = history_end >= 0
    prev = seq.offsets[users[has_history]] + history_end[has_history]
    assert (seq.timestamps[prev] <= samples["timestamp"].to_numpy()[has_history]).all()


def test_labels_follow_the_rating_rule(ml100k):
    data = PreparedData.load(ml100k)
    for split in SPLITS:
        samples = data.samples(split)
        assert (samples["label"] == (samples["rating"] >= 4)).all()
        assert data.meta["splits"][split]["positive_rate"] == pytest.approx(samples["label"].mean())
    assert np.array_equal(data.sequences.labels, (data.sequences.ratings >= 4).astype(np.int8))


def test_item_text_and_user_profile(ml100k):
    data = PreparedData.load(ml100k)
    toy = data.items[data.items["raw_id"] == 1].iloc[0]
    assert toy["title"] == "Toy Story (1995)" and toy["year"] == 1995
    assert list(toy["genres"]) == ["Animation", "Children's", "Comedy"]
    assert (
        toy["text"]
        == "Here is a movie. Its title is Toy Story (1995). The movie's genre is Animation, Children's, Comedy."
    )
    first = data.users[data.users["raw_id"] == 1].iloc[0]
    assert first["profile_text"] == "The user is a male. His job is technician. His age is 24."
    second = data.users[data.users["raw_id"] == 2].iloc[0]
    assert second["profile_text"] == "The user is a female. Her job is other. Her age is 53."
    assert not data.users["zip"].isna().any() and "94043" not in second["profile_text"]


def test_rerun_is_a_noop_and_another_config_refuses(ml100k, config):
    marker = (ml100k / "_SUCCESS.json").read_text()
    assert prepare_dataset(config("data.test_subsample=null", "data.next_item.max_per_split=null"), ml100k) == ml100k
    assert (ml100k / "_SUCCESS.json").read_text() == marker
    with pytest.raises(StageOutputExists, match="--overwrite"):
        prepare_dataset(
            config("data.test_subsample=null", "data.next_item.max_per_split=null", "data.k_core=10"), ml100k
        )
    assert (ml100k / "_SUCCESS.json").read_text() == marker


def test_test_subsample_is_fixed_by_the_seed(ray_local, tmp_path, config):
    a = prepare_dataset(config("data.test_subsample=500", "run.seed=7"), tmp_path / "a")
    b = prepare_dataset(config("data.test_subsample=500", "run.seed=7"), tmp_path / "b")
    test_a, test_b = (PreparedData.load(d).samples("test") for d in (a, b))
    assert len(test_a) == 500 and test_a.equals(test_b)
    assert test_a["sample_id"].is_monotonic_increasing
    assert test_a["sample_id"].min() >= 89_358  # still inside the full test split
    meta = json.loads((a / "meta.json").read_text())
    assert meta["test_subsample"]["size"] == 500 and meta["test_subsample"]["seed"] == 7
    assert meta["splits"]["test"]["rows"] == 500 and meta["splits"]["test"]["rows_before_subsample"] == 9_929
    assert len(PreparedData.load(a).sequences.item_ids) == 99_287  # histories keep every behaviour

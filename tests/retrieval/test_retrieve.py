import numpy as np
import pandas as pd
import pytest

from reclora_ray.config import load_config
from reclora_ray.data.prepared import PreparedData
from reclora_ray.retrieval.history import HistoryRetriever
from reclora_ray.retrieval.retrieve import load_retrieval, retrieve_histories
from reclora_ray.rundir import RunDir, StageOutputExists

pytestmark = pytest.mark.ray


def test_retrieve_stage_matches_the_core_in_sample_order(run_dir, ray_local, write_embeddings):
    data = PreparedData.load(run_dir / "data")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((data.n_items, 16)).astype(np.float32)
    write_embeddings(run_dir / "embeddings", vectors)
    # Small batches and two actors: several blocks per split, whose order must survive.
    cfg = load_config("tiny", ["retrieve.batch_size=97", "retrieve.concurrency=2"])
    retrieve_histories(cfg, run_dir)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    core = HistoryRetriever(data.sequences.offsets, data.sequences.item_ids, unit, k_long=20, k_short=5)
    for split in ("train", "valid", "test"):
        samples = data.samples(split)
        got = load_retrieval(run_dir, split)
        np.testing.assert_array_equal(got.sample_id, samples["sample_id"])
        hist_long, hist_short = core.retrieve(samples["user_id"], samples["item_id"], samples["pos"])
        np.testing.assert_array_equal(got.hist_long, hist_long)
        np.testing.assert_array_equal(got.hist_short, hist_short)
    raw = pd.read_parquet(run_dir / "retrieval" / "test.parquet")
    assert list(raw.columns) == ["sample_id", "hist_long", "hist_short"]
    assert str(raw["hist_long"].dtype) == "object" and raw["hist_long"].iloc[-1].dtype == np.int32
    assert load_retrieval(RunDir(run_dir), "valid").hist_long.shape[1] == 20


def test_recent_needs_no_embeddings_and_other_configs_refuse(run_dir, ray_local):
    cfg = load_config("tiny", ["retrieve.long_mode=recent", "retrieve.short_mode=recent"])
    retrieve_histories(cfg, run_dir)
    data = PreparedData.load(run_dir / "data")
    samples = data.samples("train")
    got = load_retrieval(run_dir, "train")
    np.testing.assert_array_equal(
        got.hist_long, data.sequences.recent(samples["user_id"].to_numpy(), samples["pos"].to_numpy(), 20)
    )
    with pytest.raises(StageOutputExists):
        retrieve_histories(
            load_config("tiny", ["retrieve.long_mode=recent", "retrieve.short_mode=recent", "retrieve.k_short=3"]),
            run_dir,
        )


def test_semantic_without_embeddings_is_a_clear_error(run_dir, write_embeddings):
    with pytest.raises(FileNotFoundError, match="run `reclora embed` first"):
        retrieve_histories(load_config("tiny"), run_dir)
    write_embeddings(run_dir / "embeddings", np.ones((90, 8), np.float32))
    with pytest.raises(ValueError, match="embed.pca_dim=16"):
        retrieve_histories(load_config("tiny"), run_dir)


def test_blocks_hold_whole_users_and_give_every_actor_a_share():
    from reclora_ray.retrieval.retrieve import user_block_bounds

    users = np.repeat(np.arange(6), [5, 1, 7, 2, 2, 3])  # 20 rows sorted by user
    bounds = user_block_bounds(users, size=10)  # two actors: about 10 rows each
    assert bounds.tolist() == [0, 13, 20]  # cut where user 3 starts, after the 10th row
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert set(users[a:b]).isdisjoint(users[:a]) and set(users[a:b]).isdisjoint(users[b:])
    assert user_block_bounds(users, size=100).tolist() == [0, 20]
    assert user_block_bounds(np.zeros(0, int), size=4).tolist() == [0, 0]
    assert len(user_block_bounds(np.arange(20), size=5)) == 5  # one row per user: even blocks

import numpy as np
import pytest

from reclora_ray.config import load_config
from reclora_ray.retrieval.embed import EmbeddingError, ItemEncoder, embed_items, fit_pca, load_item_embeddings, project


def test_load_item_embeddings_orders_and_normalises(tmp_path, write_embeddings):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6, 4)).astype(np.float32) * 3
    order = np.array([3, 0, 5, 1, 4, 2])
    write_embeddings(tmp_path, vectors[order], item_ids=order)
    loaded = load_item_embeddings(tmp_path, n_items=6, dim=4)
    np.testing.assert_allclose(loaded, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), rtol=1e-6)


def test_missing_items_are_named(tmp_path, write_embeddings):
    write_embeddings(tmp_path, np.ones((5, 4), np.float32), item_ids=np.array([0, 1, 2, 4, 6]))
    with pytest.raises(EmbeddingError, match=r"covers 5 of 7 items; missing item_id 3, 5"):
        load_item_embeddings(tmp_path, n_items=7)


def test_dimension_mismatch(tmp_path, write_embeddings):
    write_embeddings(tmp_path, np.ones((3, 4), np.float32))
    with pytest.raises(EmbeddingError, match=r"dimension 4, the config expects embed.pca_dim=8"):
        load_item_embeddings(tmp_path, n_items=3, dim=8)


def test_ragged_duplicate_and_absent_files(tmp_path, write_embeddings):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"item_id": [0, 1], "embedding": [[1.0, 0.0], [1.0, 0.0, 0.0]]}), tmp_path / "item_embeddings.parquet"
    )
    with pytest.raises(EmbeddingError, match=r"row 1 \(item_id 1\) has dimension 3, row 0 has 2"):
        load_item_embeddings(tmp_path, n_items=2)
    write_embeddings(tmp_path, np.ones((3, 2), np.float32), item_ids=np.array([0, 1, 1]))
    with pytest.raises(EmbeddingError, match="item_id 1 appears more than once"):
        load_item_embeddings(tmp_path, n_items=2)
    with pytest.raises(FileNotFoundError, match="run `reclora embed` first"):
        load_item_embeddings(tmp_path / "nowhere", n_items=2)


def test_pca_keeps_structure_and_is_reproducible():
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((3, 20))
    hidden = (rng.standard_normal((200, 3)) * [5, 3, 1]) @ basis + 0.01 * rng.standard_normal((200, 20))
    pca = fit_pca(hidden.astype(np.float32), 3)
    assert pca["explained_variance_ratio"].sum() > 0.99
    again = fit_pca(hidden[::-1].copy().astype(np.float32), 3)
    np.testing.assert_allclose(np.abs(pca["components"] @ again["components"].T), np.eye(3), atol=1e-4)
    np.testing.assert_allclose(pca["components"], again["components"], atol=1e-4)  # signs fixed
    vectors = project(hidden.astype(np.float32), pca["mean"], pca["components"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    with pytest.raises(EmbeddingError, match="pca_dim=21 exceeds"):
        fit_pca(hidden.astype(np.float32), 21)


def test_mean_pooling_ignores_padding():
    cfg = load_config("tiny", ["llm.dtype=float32"])  # exact arithmetic: padding must change nothing
    encoder = ItemEncoder(cfg.llm, pooling="mean", max_length=64)
    short = "Here is a movie. Its title is Heat (1995)."
    long = short + " The movie's genre is Action, Crime, Thriller, Drama, Mystery."
    import pandas as pd

    alone = encoder(pd.DataFrame({"item_id": [0], "text": [short]}))["embedding"][0]
    batched = encoder(pd.DataFrame({"item_id": [0, 1], "text": [short, long]}))["embedding"]
    np.testing.assert_allclose(alone, batched[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])
    last = ItemEncoder(cfg.llm, pooling="last", max_length=64)
    np.testing.assert_allclose(
        last(pd.DataFrame({"item_id": [0], "text": [short]}))["embedding"][0],
        last(pd.DataFrame({"item_id": [0, 1], "text": [short, long]}))["embedding"][0],
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.ray
def test_embed_stage_writes_unit_vectors_once(run_dir, ray_local):
    cfg = load_config("tiny", ["embed.concurrency=1", "embed.batch_size=32"])
    out = embed_items(cfg, run_dir)
    vectors = load_item_embeddings(out, n_items=90, dim=16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    assert (out / "pca.npz").is_file() and (out / "config.yaml").is_file()
    stamp = (out / "item_embeddings.parquet").stat().st_mtime_ns
    embed_items(cfg, run_dir)  # same config: a no-op
    assert (out / "item_embeddings.parquet").stat().st_mtime_ns == stamp
    # A second pass projecting inside the actors gives the same vectors as the driver did.
    sampled = load_config("tiny", ["embed.concurrency=1", "embed.pca_fit_items=90"])
    np.testing.assert_allclose(
        load_item_embeddings(embed_items(sampled, run_dir, overwrite=True), 90), vectors, atol=1e-4
    )

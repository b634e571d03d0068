"""Metrics by parts (the workers' per-block summaries) against sklearn on all rows, and the
predictions reader over Parquet shards and an older run's single file."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from reclora_ray import predictions
from reclora_ray.metrics import EPS, binary_block_stats, binary_metrics, combine_binary_stats
from reclora_ray.predictions import LEGACY_FILE, SHARDS, has_predictions, read_predictions, scored_outputs


def _split_sorted(labels, probs, cuts, rng):
    """Contiguous runs of the probability-sorted rows (as a distributed sort leaves them), shuffled."""
    order = np.argsort(np.clip(probs, EPS, 1 - EPS), kind="stable")
    parts = np.split(order, cuts)
    rng.shuffle(parts)
    return [binary_block_stats(labels[i], probs[i]) for i in parts]


@pytest.mark.parametrize("seed", range(30))
def test_metrics_by_parts_equal_sklearn_on_all_rows(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    probs = np.round(rng.random(n), int(rng.integers(1, 4))).astype(np.float32)  # many ties, across parts too
    probs[rng.random(n) < 0.1] = 0.0  # clipped to EPS: more ties
    labels = (rng.random(n) < probs * 0.8 + 0.1).astype(np.int64)
    cuts = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(1, 10)), replace=False))
    got = combine_binary_stats(_split_sorted(labels, probs, cuts, rng))
    q = np.clip(probs.astype(np.float64), EPS, 1 - EPS)
    assert got["n"] == n
    assert got["auc"] == pytest.approx(roc_auc_score(labels, q), abs=1e-12)
    assert got["logloss"] == pytest.approx(log_loss(labels, q), rel=1e-12)
    assert got == pytest.approx(binary_metrics(labels, probs), rel=1e-12)


def test_all_ties_in_every_part_is_half():
    labels = np.array([0, 1, 1, 0, 1, 0])
    stats = [binary_block_stats(labels[i : i + 2], np.full(2, 0.3)) for i in (0, 2, 4)]
    assert combine_binary_stats(stats)["auc"] == 0.5


def test_parts_that_are_not_sorted_runs_and_bad_probabilities_are_refused():
    with pytest.raises(ValueError, match="not contiguous runs"):
        combine_binary_stats([binary_block_stats([0, 1], [0.1, 0.9]), binary_block_stats([1, 0], [0.5, 0.6])])
    with pytest.raises(ValueError, match="NaN or inf"):
        combine_binary_stats([binary_block_stats([0, 1], [0.1, np.nan])])
    assert np.isnan(combine_binary_stats([binary_block_stats([1, 1], [0.1, 0.2])])["auc"])  # one class


def _frame(ids):
    return pd.DataFrame(
        {
            "sample_id": ids,
            "user_id": np.asarray(ids) % 7,
            "label": np.asarray(ids) % 2,
            "p_yes": np.linspace(0, 1, len(ids)).astype(np.float32),
        }
    )


def test_read_predictions_reads_shards_and_the_single_file_sorted_by_sample_id(tmp_path):
    shards = tmp_path / "scores" / "new"
    (shards / SHARDS).mkdir(parents=True)
    ids = np.random.default_rng(0).permutation(50)
    for k, part in enumerate(np.array_split(ids, 3)):
        table = pa.Table.from_pandas(_frame(part), preserve_index=False)
        table = table.append_column(
            "gate", pa.FixedSizeListArray.from_arrays(pa.array(np.ones(len(part) * 4, np.float32)), 4)
        )
        pq.write_table(table, shards / SHARDS / f"part-{k}.parquet")
    legacy = tmp_path / "scores" / "old"
    legacy.mkdir()
    _frame(ids[::-1]).to_parquet(legacy / LEGACY_FILE)
    (tmp_path / "scores" / "empty").mkdir()

    assert [p.name for p in scored_outputs(tmp_path / "scores")] == ["new", "old"]
    assert not has_predictions(tmp_path / "scores" / "empty")
    new, old = read_predictions(shards), read_predictions(legacy)
    assert new["sample_id"].tolist() == old["sample_id"].tolist() == list(range(50))
    assert np.stack(new["gate"].to_numpy()).shape == (50, 4)
    assert list(read_predictions(shards, ["label", "p_yes"]).columns) == ["label", "p_yes"]
    with pytest.raises(FileNotFoundError, match="holds no predictions"):
        read_predictions(tmp_path / "scores" / "empty")


@pytest.mark.ray
def test_small_outputs_are_summarized_on_the_driver_with_the_figures_ray_data_gives(ray_local, tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    (tmp_path / SHARDS).mkdir()
    for k, part in enumerate(np.array_split(rng.permutation(300), 4)):
        frame = _frame(part).assign(p_yes=np.round(rng.random(len(part)), 2), dtype=["bfloat16", "float32"][k % 2])
        table = pa.Table.from_pandas(frame, preserve_index=False)
        scores = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(len(part) * 3)), 3)
        pq.write_table(table.append_column("scores", scores), tmp_path / SHARDS / f"part-{k}.parquet")
    assert predictions.shard_rows(tmp_path) == 300

    def figures():
        top = lambda batch: {"top": np.argmax(np.stack(batch["scores"]), axis=1) == batch["label"]}  # noqa: E731
        return (
            predictions.binary_metrics_of(tmp_path),
            predictions.mean_metrics_of(tmp_path, ["scores", "label"], top),
            predictions.unique_strings(tmp_path, "dtype"),
        )

    local = figures()  # 300 rows <= LOCAL_ROWS: read on the driver, no Ray Data job
    monkeypatch.setattr(predictions, "LOCAL_ROWS", 0)
    by_workers = figures()
    frame = read_predictions(tmp_path)
    assert local[0] == pytest.approx(by_workers[0], rel=1e-12) == binary_metrics(frame["label"], frame["p_yes"])
    expected_top = np.mean(np.argmax(np.stack(frame["scores"]), axis=1) == frame["label"])
    assert local[1] == pytest.approx(by_workers[1], rel=1e-12) == {"top": expected_top, "n": 300}
    assert local[2] == by_workers[2] == ["bfloat16", "float32"]

"""Reading a split for scoring: row ranges that give every actor of a pool work, read back whole."""

import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reclora_ray.scoring import RowCounter, call_rows, counted, read_slice, row_ranges, scoring_progress, split_rows


def _split(path, n: int, row_group_size: int):
    pq.write_table(
        pa.table({"sample_id": np.arange(n), "label": np.arange(n) % 2}), path, row_group_size=row_group_size
    )
    return path


@pytest.mark.parametrize(
    ("n", "group", "min_ranges", "expected"),
    [
        (2000, 2000, 8, 8),  # the quickstart's test split: one row group, cut into 8 pieces
        (2500, 1000, 8, 9),  # three groups, each cut into ceil(8 / 3) = 3 pieces
        (2500, 100, 8, 25),  # enough groups already: one range each
        (5, 5, 8, 5),  # fewer rows than ranges asked for: one row each
        (2000, 2000, 1, 1),
    ],
)
def test_row_ranges_cover_the_file_once_in_order(tmp_path, n, group, min_ranges, expected):
    path = _split(tmp_path / "split.parquet", n, group)
    ranges = row_ranges(path, min_ranges)
    assert len(ranges) == expected
    assert all(hi > lo for lo, hi in ranges)
    read = np.concatenate([read_slice(path, lo, hi).column("sample_id").to_numpy() for lo, hi in ranges])
    np.testing.assert_array_equal(read, np.arange(n))
    for g in range(-(-n // group)):  # a group's pieces are equal to a row, and none crosses groups
        sizes = [hi - lo for lo, hi in ranges if lo // group == g]
        assert max(sizes) - min(sizes) <= 1 and all((hi - 1) // group == lo // group for lo, hi in ranges)


def test_calls_are_sized_so_every_actor_gets_several():
    assert call_rows(200, 128, actors=2) == 25  # not 128 + 72: four calls per actor
    assert call_rows(2000, 128, actors=2) == 128
    assert call_rows(3, 128, actors=2) == 1


@pytest.mark.ray
def test_a_one_row_group_split_is_scored_by_every_actor_of_the_pool(ray_local, tmp_path, monkeypatch):
    """A split written as one row group used to be one block, which a 2-actor pool scored on one."""
    import ray.data

    # Both actors up before the first call: what is tested is how the work is cut, not start-up skew.
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 120)

    class Pid:  # defined here so Ray ships it by value (the tests are not importable by the workers)
        def __call__(self, batch):
            time.sleep(0.2)  # a scorer's pace: the first actor up must not drain the pool's queue alone
            return batch.assign(pid=os.getpid())

    path = _split(tmp_path / "test.parquet", 640, 640)
    keep = np.arange(0, 640, 2)
    rows = split_rows(path, keep=keep, actors=2)
    assert rows.n_rows == len(keep) and rows.dataset.materialize().num_blocks() == 8
    scored = rows.dataset.map_batches(
        Pid,
        batch_size=call_rows(rows.n_rows, 128, actors=2),
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=2),
    ).to_pandas()
    assert sorted(scored["sample_id"]) == keep.tolist()
    assert scored["pid"].nunique() == 2


@pytest.mark.ray
def test_the_pools_rows_are_counted_for_the_progress_line(ray_local, tmp_path, caplog):
    import ray
    import ray.data

    class Echo:  # a callable class with constructor arguments, like the scorers
        def __init__(self, tag):
            self.tag = tag

        def __call__(self, batch):
            return batch.assign(tag=self.tag)

    path = _split(tmp_path / "test.parquet", 300, 100)
    rows = split_rows(path, actors=1)
    counter = ray.remote(num_cpus=0)(RowCounter).remote()
    scored = rows.dataset.map_batches(
        counted(Echo),
        fn_constructor_kwargs={"counter": counter, "tag": "x"},
        batch_size=call_rows(rows.n_rows, 128, actors=1),
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    assert counted(Echo).__name__ == "Echo"  # Ray names the operator MapBatches(Echo)
    caplog.set_level(logging.INFO, logger="reclora_ray.scoring")
    with scoring_progress("scoring test", rows.n_rows, counter, poll_s=0.05):
        frame = scored.to_pandas()
    assert len(frame) == 300 and set(frame["tag"]) == {"x"}
    assert ray.get(counter.total.remote()) == 300
    assert caplog.records[-1].getMessage().startswith("scoring test: 300/300 rows (100%)")


def test_the_score_stages_start_our_ray_before_ray_data_would_start_its_own(monkeypatch, tmp_path):
    """Building the split's Dataset starts a default Ray when none runs (all interfaces, its
    console chatter, no token): a standalone `reclora score` must start ours first."""
    from reclora_ray.llm import next_item_score, score
    from reclora_ray.rundir import RunDir
    from reclora_ray.variants import get_variant
    from tests.conftest import tiny_config

    calls = []
    for module in (score, next_item_score):
        monkeypatch.setattr(module, "init_ray", lambda cfg: calls.append("init_ray"))
        monkeypatch.setattr(module, "split_rows", lambda *a, **k: calls.append("split_rows") or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        score.ctr_test_rows(tiny_config(), RunDir(tmp_path), get_variant("tallrec"), subsample=False)
    assert calls == ["init_ray", "split_rows"]
    calls.clear()

    class Stage:
        cfg, out, run = tiny_config(), tmp_path, RunDir(tmp_path)

    with pytest.raises(ZeroDivisionError):
        next_item_score._score_next(None, {}, Stage, 0, {})
    assert calls == ["init_ray", "split_rows"]

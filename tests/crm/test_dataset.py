import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reclora_ray.crm.dataset import encode_rows, iter_split, read_rows
from reclora_ray.crm.features import build_features
from reclora_ray.data.prepared import PreparedData, PreparedDataError
from reclora_ray.rundir import RunDir
from tests.crm.conftest import with_crm


@pytest.fixture(scope="module")
def prepared(prepared_run):
    return PreparedData.load(prepared_run / "data")


def test_read_rows_spans_row_groups(prepared):
    path = prepared.split_path("train")
    assert pq.ParquetFile(path).metadata.num_row_groups > 3
    whole = pd.read_parquet(path)
    for start, stop in [(0, 5), (690, 1410), (1399, 1400), (len(whole) - 3, len(whole))]:
        part = read_rows(path, start, stop, ["sample_id", "pos"]).to_pandas()
        pd.testing.assert_frame_equal(part, whole.iloc[start:stop][["sample_id", "pos"]].reset_index(drop=True))


def test_long_history_follows_the_retrieval_file(prepared, crm_cfg):
    spec, _ = build_features(prepared, crm_cfg.crm, history_len=20)
    assert spec.history == "long"
    batch = encode_rows(prepared.run, "valid", spec, prepared.sequences, 100, 400)
    retrieval = pd.read_parquet(prepared.run.retrieval / "valid.parquet").iloc[100:400]
    samples = prepared.samples("valid").iloc[100:400]
    assert (batch["sample_id"] == samples["sample_id"].to_numpy()).all()
    seq = prepared.sequences
    for row, (user, hist) in enumerate(zip(samples["user_id"], retrieval["hist_long"])):
        items = seq.item_ids[seq.offsets[user] + np.asarray(hist, dtype=np.int64)] + 1
        got = batch["hist_item"][row]
        assert (got[len(got) - len(items) :] == items).all() and (got[: len(got) - len(items)] == 0).all()


def test_recent_history_is_the_last_k_behaviours(prepared, crm_cfg):
    spec, _ = build_features(prepared, with_crm(crm_cfg, history="recent").crm, history_len=6)
    batch = encode_rows(prepared.run, "test", spec, prepared.sequences, 0, 50)
    samples = prepared.samples("test").iloc[:50]
    seq = prepared.sequences
    for row, (user, pos) in enumerate(zip(samples["user_id"], samples["pos"])):
        start = seq.offsets[user]
        expected = seq.item_ids[start + max(0, pos - 6) : start + pos] + 1
        assert batch["hist_item"][row][6 - len(expected) :].tolist() == expected.tolist()


def test_iter_split_covers_every_row_in_order(prepared, crm_cfg):
    spec, _ = build_features(prepared, crm_cfg.crm, history_len=20)
    ids = np.concatenate([chunk["sample_id"] for chunk in iter_split(prepared, "train", spec, chunk_rows=999)])
    assert (ids == prepared.samples("train", ["sample_id"])["sample_id"].to_numpy()).all()


def test_missing_or_stale_retrieval_is_a_clear_error(prepared_run, tmp_path, crm_cfg):
    shutil.copytree(prepared_run, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    prepared = PreparedData.load(run.data)
    spec, _ = build_features(prepared, crm_cfg.crm, history_len=20)
    stale = pq.read_table(run.retrieval / "test.parquet")
    stale = stale.set_column(0, "sample_id", pa.array(stale.column("sample_id").to_numpy()[::-1].copy()))
    pq.write_table(stale, run.retrieval / "test.parquet")
    with pytest.raises(PreparedDataError, match=r"retrieval/test.parquet: row 0 has sample_id .* stale"):
        encode_rows(run, "test", spec, prepared.sequences, 0, 10)
    (run.retrieval / "test.parquet").unlink()
    with pytest.raises(PreparedDataError, match="run `reclora retrieve` first"):
        encode_rows(run, "test", spec, prepared.sequences, 0, 10)

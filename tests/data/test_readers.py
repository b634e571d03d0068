"""Each raw format parses to the expected tables; the protocol options act as documented."""

import numpy as np
import pandas as pd
import pytest

from reclora_ray.data.checks import LogRules
from reclora_ray.data.prepare import prepare_dataset, read_behaviours
from reclora_ray.data.prepared import SPLITS, PreparedData
from reclora_ray.data.readers import DelimitedFormat, byte_ranges, open_source, parse_delimited_range

pytestmark = pytest.mark.ray


def log_rows(source, blocks=None) -> list[tuple]:
    b = read_behaviours(source, blocks)
    users, items = b.user_raw.to_pylist(), b.item_raw.to_pylist()
    rows = zip(b.user, b.item, b.rating, b.timestamp)
    return sorted((users[u], items[i], float(r), int(t)) for u, i, r, t in rows)


def test_ml100k_grouplens_folder(ray_local, raw_dir):
    source = open_source("ml-100k", str(raw_dir("ml-100k")))
    assert log_rows(source)[:3] == [(1, 10, 5.0, 881250949), (1, 20, 3.0, 881250950), (1, 30, 4.0, 881250960)]
    assert len(log_rows(source)) == 9
    items = source.read_items(np.array([10, 20, 30])).set_index("raw_id")
    assert items.loc[20, "title"] == "Café Society (1995)"  # latin-1
    assert items.loc[10, "genres"] == ["Animation", "Children's", "Comedy"]
    assert items.loc[30, "genres"] == ["unknown"] and pd.isna(items.loc[30, "year"])
    users = source.read_users().set_index("raw_id")
    assert users.loc[2].tolist() == ["female", "53", "other", "94043"]


def test_ml1m_folder_decodes_codes(ray_local, raw_dir):
    source = open_source("ml-1m", str(raw_dir("ml-1m")))
    assert log_rows(source)[0] == (1, 661, 3.0, 978302109)
    items = source.read_items(np.array([661])).set_index("raw_id")
    assert items.loc[661, "genres"] == ["Animation", "Children's", "Musical"] and items.loc[661, "year"] == 1996
    assert items.loc[1000, "title"] == "Curé Nothing (1999)"
    users = source.read_users().set_index("raw_id")
    assert users.loc[1].tolist() == ["female", "Under 18", "K-12 student", "48067"]
    assert users.loc[2].tolist() == ["male", "56+", "self-employed", "70072"]


def test_ml25m_folder(ray_local, raw_dir):
    source = open_source("ml-25m", str(raw_dir("ml-25m")))
    assert log_rows(source) == [
        (1, 296, 5.0, 1147880044),
        (1, 306, 3.5, 1147868817),
        (1, 307, 3.0, 1147868828),
        (2, 296, 0.5, 1147878820),
        (2, 307, 4.0, 1147879000),
    ]
    items = source.read_items(np.array([296, 306, 307])).set_index("raw_id")
    assert items.loc[306, "title"] == "American President, The (1995)"
    assert items.loc[307, "title"] == "Bourne Legacy" and items.loc[307, "genres"] == []
    assert pd.isna(items.loc[307, "year"])
    assert source.read_users() is None


def test_goodreads_drops_unrated_shelvings(ray_local, raw_dir):
    source = open_source("goodreads", str(raw_dir("goodreads")))
    rows = log_rows(source)
    assert len(rows) == 4 and all(r[2] > 0 for r in rows)
    assert ("8842281e1d1347389f2ab93d60773d4d", 18245960, 3.0, 1504076426) in rows  # date_updated, UTC
    items = source.read_items(np.array([24375664, 18245960])).set_index("raw_id")
    assert items.loc[24375664, "genres"] == ["fantasy", "young-adult", "fiction"]  # top shelves, not "to-read"
    assert items.loc[24375664, "authors"] == ["Erin Morgenstern", "Jane Doe"]
    assert items.loc[18245960, "year"] is pd.NA
    assert 6392944 not in items.index  # only the books asked for are kept


def test_byte_ranges_cover_every_line_once(tmp_path):
    path = tmp_path / "ratings.csv"
    lines = [f"{u},{u * 7},{(u % 10) / 2 + 0.5},{1000 + u}" for u in range(1, 501)]
    path.write_text("userId,movieId,rating,timestamp\n" + "\n".join(lines) + "\n")
    fmt = DelimitedFormat(",", ("user", "item", "rating", "timestamp"), header="userId,movieId,rating,timestamp")
    for n in (1, 3, 7, 64):
        parts = [
            parse_delimited_range(task, fmt, LogRules(0.5, 5.0)) for task in byte_ranges(path, 10**9, min_ranges=n)
        ]
        users = np.concatenate([p["user"].to_numpy() for p in parts])
        assert np.array_equal(users, np.arange(1, 501)), n


def test_min_history_keeps_first_behaviours_out_of_the_samples(ray_local, raw_dir, tmp_path, config):
    raw = raw_dir("ml-1m")
    cfg = config(
        "data.dataset=ml-1m",
        f"data.raw_dir={raw}",
        "data.k_core=0",
        "data.min_history=1",
        "data.split=[0.5,0.25,0.25]",
        "data.test_subsample=null",
    )
    data = PreparedData.load(prepare_dataset(cfg, tmp_path / "data"))
    samples = pd.concat([data.samples(s) for s in SPLITS])
    assert len(samples) == 4 and (samples["pos"] >= 1).all()  # 6 ratings, 2 users
    assert data.meta["n_rows"] == 6 and data.meta["min_history"] == 1
    assert data.users.set_index("raw_id").loc[1, "profile_text"] == (
        "The user is a female. Her job is K-12 student. Her age is Under 18."
    )


def test_ml25m_label_is_strictly_above_three(ray_local, raw_dir, tmp_path, config):
    raw = raw_dir("ml-25m")
    cfg = config(
        "data.dataset=ml-25m",
        f"data.raw_dir={raw}",
        "data.k_core=0",
        "data.split=[0.4,0.2,0.4]",
        "data.test_subsample=null",
    )
    data = PreparedData.load(prepare_dataset(cfg, tmp_path / "data"))
    assert data.meta["label_rule"] == "rating > 3"
    assert np.array_equal(data.sequences.labels, (data.sequences.ratings > 3.0).astype(np.int8))
    assert {3.0: 0, 3.5: 1}.items() <= dict(zip(data.sequences.ratings, data.sequences.labels)).items()
    assert data.meta["user_fields"] == [] and (data.users["profile_text"] == "").all()


def test_goodreads_prepares_book_text(ray_local, raw_dir, tmp_path, config):
    raw = raw_dir("goodreads")
    cfg = config(
        "data.dataset=goodreads",
        f"data.raw_dir={raw}",
        "data.k_core=2",
        "data.split=[0.5,0.25,0.25]",
        "data.test_subsample=null",
    )
    data = PreparedData.load(prepare_dataset(cfg, tmp_path / "data"))
    assert (data.n_users, data.n_items, data.meta["n_rows"]) == (2, 2, 4)
    assert data.meta["timestamp_field"] == "date_updated"
    assert data.items.set_index("raw_id").loc[24375664, "text"] == (
        "Here is a book. Its title is The Night Circus. Its authors are Erin Morgenstern, Jane Doe. "
        "Its genres are fantasy, young-adult, fiction."
    )
    assert data.users["raw_id"].tolist() == sorted(data.users["raw_id"])

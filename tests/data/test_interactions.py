"""The generic `interactions` dataset: the ML-100K export prepares as the packaged reader does;
string ids, click logs, list fields, Parquet + CSV, cold items; every bad input is named."""

import numpy as np
import pandas as pd
import pytest

from reclora_ray.config import ConfigError, load_config
from reclora_ray.data.prepare import prepare_dataset
from reclora_ray.data.prepared import SPLITS, PreparedData
from reclora_ray.data.readers import RawDataError
from reclora_ray.llm.prompt import PromptBuilder


def assert_nothing_written(out):
    assert not out.exists()
    if out.parent.exists():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.ray
def test_ml100k_export_prepares_like_the_packaged_reader(ml100k_csv, tmp_path):
    raw = ml100k_csv
    assert len(list((raw / "interactions").glob("*.csv"))) == 3
    cfg = load_config(str(raw / "reclora.yaml"), ["run.num_cpus=2", "data.test_subsample=null"])
    data = PreparedData.load(prepare_dataset(cfg, tmp_path / "run" / "data"))
    meta = data.meta
    assert (meta["n_rows"], data.n_users, data.n_items) == (99_287, 943, 1_349)
    assert [meta["splits"][s]["rows"] for s in SPLITS] == [79_429, 9_929, 9_929]
    assert meta["label_rule"] == "rating >= 4" and meta["rated"] is True
    assert data.items["raw_id"].dtype == np.int64 and data.users["raw_id"].dtype == np.int64
    toy = data.items[data.items["raw_id"] == 1].iloc[0]
    assert (
        toy["text"]
        == "Here is a movie. Its title is Toy Story (1995). The movie's genre is Animation, Children's, Comedy."
    )
    assert data.users["profile_text"][0] == "The user is a male. His job is technician. His age is 24."
    prompt = PromptBuilder.from_prepared(data).prompt(0, 0, [1], [4.0])
    assert "He watched the following movies in order in the past, and rated them:" in prompt and "(4 stars)" in prompt


def write_click_log(root):
    """Two Parquet files and a CSV of clicks with string ids; items in CSV with '|' tags."""
    rows = []
    for u in range(6):
        for k in range(8):
            rows.append({"uid": f"u-{u}", "sku": f"sku-{(u + k) % 7}", "ts": 1000 + 10 * k + u, "clicked": (u + k) % 2})
    log = pd.DataFrame(rows)
    (root / "log").mkdir(parents=True)
    log.iloc[:20].to_parquet(root / "log" / "part-0.parquet", index=False)
    log.iloc[20:30].to_parquet(root / "log" / "part-1.parquet", index=False)
    log.iloc[30:].to_csv(root / "log" / "part-2.csv", index=False)
    items = pd.DataFrame(
        {
            "sku": [f"sku-{i}" for i in range(8)],
            "name": [f"Thing {i}" for i in range(8)],
            "blurb": ["A fine thing."] * 8,
            "tags": ["red|big", "blue", "", "red", "green|small", "blue|big", "red", "new"],
        }
    )
    items.to_csv(root / "catalogue.csv", index=False)
    return log, items


def click_config(config, root, *overrides):
    return config(
        "data.dataset=interactions",
        f"data.raw_dir={root}",
        "data.k_core=0",
        "data.test_subsample=null",
        "data.split=[0.5,0.25,0.25]",
        # the log's folder as a pyarrow URI (as s3:// or gs:// would be), the items relative to raw_dir
        f"data.files.interactions={{paths: ['file://{root}/log'], user: uid, item: sku, timestamp: ts, label: clicked}}",
        "data.files.items={paths: [catalogue.csv], item: sku, title: name, text: blurb, fields: [tags]}",
        *overrides,
    )


@pytest.mark.ray
def test_click_log_with_string_ids_list_fields_and_cold_items(ray_local, tmp_path, config):
    log, _ = write_click_log(tmp_path / "raw")
    out = prepare_dataset(click_config(config, tmp_path / "raw", "data.cold_items=true"), tmp_path / "run" / "data")
    data = PreparedData.load(out)
    meta = data.meta
    assert meta["n_rows"] == len(log) and meta["rated"] is False and meta["label_rule"] == "column 'clicked'"
    assert meta["n_cold_items"] == 1 and data.n_items == 8  # sku-7 is in the catalogue only
    assert data.items["raw_id"].tolist()[-1] == "sku-7" and data.items["item_id"].tolist() == list(range(8))
    assert data.items["tags"][0].tolist() == ["red", "big"] and data.items["tags"][2].tolist() == []
    assert data.items["text"][0] == "Here is an item. Its title is Thing 0. A fine thing. Tags: red, big."
    assert meta["item_features"] == ["tags"] and meta["vocab"]["tags"] == 6
    # labels come from the column, not from a rating threshold
    users = dict(zip(data.users["raw_id"], data.users["user_id"]))
    seq = data.sequences
    u0 = users["u-0"]
    assert seq.labels[seq.offsets[u0] : seq.offsets[u0 + 1]].tolist() == [k % 2 for k in range(8)]
    prompt = PromptBuilder.from_prepared(data).prompt(u0, 7, [0, 1], [1.0, 0.0])
    assert "The user clicked the following items in order in the past:\n['0. Thing 0', '1. Thing 1']" in prompt
    assert "star" not in prompt and "***Thing 7***" in prompt


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


LOG = "user,item,ts,stars\n1,10,100,4\n1,11,101,5\n2,10,102,3\n2,11,103,1\n"
ITEMS = "item,title\n10,Alpha\n11,Beta\n"


@pytest.mark.ray
@pytest.mark.parametrize(
    "log, items, overrides, message",
    [
        (
            LOG.replace("stars", "score"),
            ITEMS,
            [],
            r"log\.csv: no column 'stars' \(mapped in data\.files\.interactions\)",
        ),
        (
            LOG,
            ITEMS,
            ["data.files.items.fields=[genre]"],
            r"items\.csv: no column 'genre' \(mapped in data\.files\.items\)",
        ),
        ("", ITEMS, [], r"log\.csv: empty file"),
        (LOG, "item,title\n", [], r"items\.csv: empty file \(no rows\)"),
        (
            LOG.replace("1,11,101,5", "1,11,101,five"),
            ITEMS,
            [],
            r"log\.csv, line 3: field 'stars' is not a number: 'five'",
        ),
        (
            LOG.replace("stars", "clicked"),
            ITEMS,
            ["data.files.interactions.rating=null", "data.files.interactions.label=clicked"],
            r"log\.csv, line 2: field 'clicked' must be 0 or 1, got '4'",
        ),
        (
            LOG,
            ITEMS + "11,Gamma\n",
            [],
            r"items\.csv, line 4: field 'title': item 11 is titled 'Gamma' here but 'Beta' "
            r"at .*items\.csv, line 3",
        ),
        (LOG.replace("2,10,102", "2,,102"), ITEMS, [], r"log\.csv, line 4: field 'item' is empty"),
        (
            LOG.replace("1,11,101", "1,11,noon"),
            ITEMS,
            [],
            r"log\.csv, line 3: field 'ts' is not unix seconds or an ISO-8601 date: 'noon'",
        ),
    ],
)
def test_bad_input_names_file_row_and_field(ray_local, tmp_path, config, log, items, overrides, message):
    raw = tmp_path / "raw"
    write(raw / "log.csv", log)
    write(raw / "items.csv", items)
    cfg = config(
        "data.dataset=interactions",
        f"data.raw_dir={raw}",
        "data.k_core=0",
        "data.test_subsample=null",
        "data.split=[0.5,0.25,0.25]",
        "data.files.interactions={paths: [log.csv], user: user, item: item, timestamp: ts, rating: stars}",
        "data.files.items={paths: [items.csv], item: item, title: title}",
        *overrides,
    )
    out = tmp_path / "run" / "data"
    with pytest.raises(RawDataError, match=message):
        prepare_dataset(cfg, out)
    assert_nothing_written(out)


def test_config_names_what_is_unmapped(config):
    with pytest.raises(ConfigError, match=r"data\.files\.interactions: map a rating or a label column"):
        config("data.dataset=interactions", "data.files.interactions.paths=[x.csv]", "data.files.items.paths=[y.csv]")
    with pytest.raises(ConfigError, match=r"data\.files\.items\.paths: dataset 'interactions' needs"):
        config("data.dataset=interactions", "data.files.interactions={paths: [x.csv], rating: r}")
    with pytest.raises(ConfigError, match=r"data\.files\.interactions\.usr: unknown key \(did you mean .*user\?\)"):
        config("data.files.interactions.usr=u")
    with pytest.raises(ConfigError, match=r"data\.text\.prompt\[1\]: .*names \['0'\]"):
        config("data.text.prompt=['{title}', 'the {0}']")
    with pytest.raises(ConfigError, match=r"data\.text\.history_item: unknown fields \['name'\]; available: index"):
        config("data.text.history_item='{index}. {name}'")


def test_unknown_template_field_stops_before_work(tmp_path, config):
    from reclora_ray.data import text

    with pytest.raises(ValueError, match=r"data\.text\.description: \['colour'\] are not fields of the items table"):
        text.descriptions(pd.DataFrame({"title": ["a"]}), ["{title}", " {colour}"])

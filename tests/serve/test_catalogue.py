"""Catalogue ids on a generic dataset, without Serve: the online core maps raw ids, names
unknown ones, and scores a cold-start item (in the items table, never interacted with) from its text."""

import shutil

import numpy as np
import pytest

from reclora_ray.config import load_config
from reclora_ray.data.catalogue import add_catalogue_ids
from reclora_ray.data.prepare import prepare_dataset
from reclora_ray.rundir import RunDir
from reclora_ray.serve.online import OnlineScorer, RequestError

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cold_run(ml100k_csv, tmp_path_factory):
    """The ML-100K export plus one catalogue item nobody rated, prepared with data.cold_items."""
    raw = tmp_path_factory.mktemp("cold") / "raw"
    shutil.copytree(ml100k_csv, raw)
    with open(raw / "items.csv", "a") as f:
        f.write("9001,Brand New Film (2026),2026,Drama|Sci-Fi\n")
    cfg = load_config(
        str(ml100k_csv / "reclora.yaml"),
        [
            "run.num_cpus=2",
            f"data.raw_dir={raw}",
            "data.cold_items=true",
            "retrieve.short_mode=recent",
            "retrieve.long_mode=recent",
        ],
    )
    out = raw.parent / "run"
    prepare_dataset(cfg, RunDir(out).data)
    return cfg, out


def test_cold_start_item_scores_from_its_text_and_unknown_ids_are_named(cold_run):
    cfg, out = cold_run
    online = OnlineScorer(cfg, out, "zero-shot")
    catalogue = online.catalogue
    assert online.data.meta["n_cold_items"] > 1  # 9001, and the items the 5-core dropped
    (cold,) = online.check_items([9001], "candidates")
    assert catalogue.cold_items[cold] and online.data.items["title"][cold] == "Brand New Film (2026)"
    warm = online.check_items(["50"], "candidates")[0]  # "50" and 50 name the same item
    assert catalogue.item_raw[warm] == 50 and not catalogue.cold_items[warm]

    state = online.user_state(13, history_items=[9001], history_ratings=[5.0], timestamp=893_000_000)
    assert state.known_user and state.user_id == catalogue.user(13) and state.items[-1] == cold
    prompt = online.scorer.inputs.prompts.prompt(state.user_id, cold, state.items[-5:], state.ratings[-5:])
    assert "***Brand New Film (2026)***" in prompt and "'4. Brand New Film (2026) (5 stars)'" in prompt
    (probs,) = online.score([state], [np.array([cold, warm])])
    assert np.all((probs > 0) & (probs < 1)) and probs[0] != probs[1]

    with pytest.raises(RequestError, match=r"unknown item ids in candidates: \[77777, 'nope'\]") as err:
        online.check_items([50, 77777, "nope", 77777], "candidates")
    assert err.value.status == 404
    assert online.user_state("13").raw_user_id == 13  # typed as in the catalogue, whatever the request sent
    stranger = online.user_state("someone-new")
    assert not stranger.known_user and stranger.user_id == -1 and stranger.cold_start


def test_predictions_get_raw_ids_beside_dense_ones(cold_run):
    _, out = cold_run
    data_dir = RunDir(out).data
    import pandas as pd

    samples = pd.read_parquet(data_dir / "samples" / "test.parquet").head(5)
    framed = add_catalogue_ids(samples[["sample_id", "user_id", "item_id", "label"]].copy(), data_dir)
    assert list(framed.columns) == ["sample_id", "user_id", "user_raw_id", "item_id", "item_raw_id", "label"]
    items = pd.read_parquet(data_dir / "items.parquet").set_index("item_id")["raw_id"]
    assert framed["item_raw_id"].tolist() == items.loc[framed["item_id"]].tolist()


def test_report_examples_name_catalogue_ids_and_titles(cold_run):
    from reclora_ray.data.catalogue import example_rows

    _, out = cold_run
    data_dir = RunDir(out).data
    import pandas as pd

    preds = pd.read_parquet(data_dir / "samples" / "test.parquet").head(10)[
        ["sample_id", "user_id", "item_id", "label"]
    ]
    preds["p_yes"] = np.linspace(0.9, 0.1, len(preds))
    lines = example_rows(data_dir, preds, n=4).splitlines()
    items = pd.read_parquet(data_dir / "items.parquet").set_index("item_id")
    users = pd.read_parquet(data_dir / "users.parquet").set_index("user_id")
    top = preds.iloc[0]  # a mixed-type row: the label reads back as a float
    assert lines[0] == "| user | item | title | label | P(yes) |" and len(lines) == 2 + 4
    assert lines[2] == (
        f"| {users.raw_id[top.user_id]} | {items.raw_id[top.item_id]} | {items.title[top.item_id]} "
        f"| {int(top.label)} | 0.900 |"
    )
    assert lines[-1].endswith("| 0.100 |")

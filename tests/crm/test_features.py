import numpy as np
import pytest

from reclora_ray.config import ConfigError
from reclora_ray.crm.features import FeatureEncoder, build_features
from reclora_ray.data.prepared import PreparedData
from tests.crm.conftest import with_crm


@pytest.fixture(scope="module")
def prepared(prepared_run):
    return PreparedData.load(prepared_run / "data")


def test_build_features_vocabularies_and_tables(prepared, crm_cfg):
    crm_cfg = with_crm(crm_cfg, user_id=True, user_fields=None)  # the defaults: every user field
    spec, tables = build_features(prepared, crm_cfg.crm, history_len=20)
    assert list(spec.user_fields) == ["user_id", "gender", "age", "occupation", "zip"]
    assert spec.user_fields["user_id"] == prepared.n_users + 1
    assert spec.user_fields["gender"] == 3  # M, F + unknown
    assert list(spec.item_fields) == ["item_id", "year"]
    assert spec.item_bags["genres"] == [7, 2]  # 6 genres + padding, at most 2 per item
    users, items = tables["user_table"], tables["item_table"]
    assert users.shape == (prepared.n_users + 1, 5) and not users[0].any()  # row 0: unknown user
    assert (users[1:, 0] == np.arange(1, prepared.n_users + 1)).all()
    assert (users[1:12:11, 3] == 0).all()  # user 0 and 11 have no occupation -> code 0
    assert items[1, 1] == 0 and items[2, 1] > 0  # item 0 has no year
    assert (tables["bag_genres"][1:, 0] > 0).all()  # every item has a genre


def test_unknown_field_names_the_key(prepared, crm_cfg):
    with pytest.raises(ConfigError, match=r"crm.user_fields: \['shoe_size'\] not usable fields of .*users.parquet"):
        build_features(prepared, with_crm(crm_cfg, user_fields=["gender", "shoe_size"]).crm, history_len=20)
    with pytest.raises(ConfigError, match="crm.item_fields"):
        build_features(prepared, with_crm(crm_cfg, user_fields=None, item_fields=["director"]).crm, history_len=20)


def test_encode_pads_truncates_and_maps_unknown_ids(prepared, crm_cfg):
    spec, _ = build_features(prepared, crm_cfg.crm, history_len=4)
    encoder = FeatureEncoder(spec)
    # 2024-01-01 00:00 UTC was a Monday; 13:00 on Wednesday 2024-01-03 is 2 days + 13 h later
    monday = 1704067200
    batch = encoder.encode(
        user_ids=[0, 10_000],
        item_ids=[5, -1],
        timestamps=[monday, monday + 2 * 86400 + 13 * 3600],
        hist_item_ids=[[1, 2, 3, 4, 5, 6], [-1, -1, -1, -1, 7, 99_999]],
        hist_ratings=[[1, 2, 3, 4, 5, 4.5], [0, 0, 0, 0, 3.5, 2]],
    )
    assert batch["user"].tolist() == [1, 0]  # unknown user -> 0
    assert batch["item"].tolist() == [6, 0]
    assert batch["context"].tolist() == [[1, 1], [14, 3]]  # hour + 1, weekday (Mon = 1) ...
    assert batch["hist_item"].tolist() == [[4, 5, 6, 7], [0, 0, 8, 0]]  # last K kept; pad / OOV -> 0
    assert batch["hist_rating"].tolist() == [[7, 9, 11, 10], [0, 0, 8, 0]]  # round(2r) + 1, 0 on padding


def test_encode_left_pads_short_histories(prepared, crm_cfg):
    spec, _ = build_features(prepared, crm_cfg.crm, history_len=5)
    batch = FeatureEncoder(spec).encode([1], [2], [0], [[3, 4]], [[5.0, 1.0]])
    assert batch["hist_item"].tolist() == [[0, 0, 0, 4, 5]]
    assert batch["hist_rating"].tolist() == [[0, 0, 0, 11, 3]]
    with pytest.raises(ValueError, match="2-D"):
        FeatureEncoder(spec).encode([1], [2], [0], [3, 4], [5.0, 1.0])


def test_user_id_can_be_left_out(prepared, crm_cfg):
    spec, tables = build_features(
        prepared, with_crm(crm_cfg, user_id=False, user_fields=["gender", "age"]).crm, history_len=20
    )
    assert list(spec.user_fields) == ["gender", "age"]
    assert tables["user_table"].shape == (prepared.n_users + 1, 2)
    with pytest.raises(ConfigError, match="crm.user_id is false and no profile field"):
        build_features(prepared, with_crm(crm_cfg, user_id=False, user_fields=[]).crm, history_len=20)

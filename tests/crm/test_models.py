import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reclora_ray.config import ConfigError
from reclora_ray.crm import CRMCheckpointError, load_crm
from reclora_ray.crm.checkpoint import save_crm
from reclora_ray.crm.dataset import iter_split
from reclora_ray.crm.features import FeatureEncoder, build_features
from reclora_ray.crm.models import MODELS, build_model
from reclora_ray.crm.models.base import recent_mean
from reclora_ray.crm.predict import predict_split
from reclora_ray.data.prepared import PreparedData
from reclora_ray.metrics import binary_metrics
from tests.crm.conftest import with_crm

PAPER_MODELS = ["sim", "din", "deepfm", "autoint", "dcnv2", "gru4rec", "caser", "sasrec"]


@pytest.fixture(scope="module")
def prepared(prepared_run):
    return PreparedData.load(prepared_run / "data")


def tensors(batch):
    return {key: torch.as_tensor(value) for key, value in batch.items()}


def make(prepared, cfg, name, history_len=20):
    cfg = with_crm(cfg, model=name)
    spec, tables = build_features(prepared, cfg.crm, history_len)
    torch.manual_seed(0)
    return build_model(spec, cfg.crm, tables)


def test_registry_holds_the_papers_models():
    assert sorted(MODELS) == sorted(PAPER_MODELS)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_model_interface_and_training_signal(prepared, crm_cfg, name):
    crm_cfg = with_crm(crm_cfg, embed_dim=16)
    model = make(prepared, crm_cfg, name)
    train = tensors(next(iter_split(prepared, "train", model.spec, chunk_rows=4000)))
    valid = next(iter_split(prepared, "valid", model.spec, chunk_rows=4000))
    empty = {key: value[:3].clone() for key, value in train.items()}
    empty["hist_item"].zero_()
    empty["hist_rating"].zero_()

    model.eval()
    with torch.no_grad():
        logits, r_c = model(train), model.represent(train)
        assert logits.shape == (len(train["label"]),)
        assert r_c.shape == (len(train["label"]), model.d_c)
        assert torch.isfinite(model(empty)).all()  # no behaviours yet (a user's first sample)
        assert torch.allclose(model.head(r_c).squeeze(-1), logits, atol=1e-5)  # forward = head(R_c)

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(4):
        for start in range(0, len(train["label"]), 256):
            batch = {key: value[start : start + 256] for key, value in train.items()}
            loss = F.binary_cross_entropy_with_logits(model(batch), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        auc = binary_metrics(valid["label"], torch.sigmoid(model(tensors(valid))).numpy())["auc"]
    assert auc > 0.6, f"{name} learned nothing from the latent-factor signal (valid AUC {auc:.3f})"


def test_checkpoint_round_trip_and_represent_paths(prepared, crm_cfg, tmp_path):
    crm_cfg = with_crm(crm_cfg, history="recent")
    model = make(prepared, crm_cfg, "sim", history_len=8).eval()
    save_crm(model, tmp_path)
    loaded = load_crm(tmp_path)
    assert json.loads((tmp_path / "crm.json").read_text())["d_c"] == model.d_c == loaded.d_c
    _, probs = predict_split(model, prepared, "test")
    _, probs_loaded = predict_split(loaded, prepared, "test", batch_size=100, chunk_rows=333)
    np.testing.assert_allclose(probs, probs_loaded, rtol=1e-5, atol=1e-6)

    # R_c has one path, CRM.represent on a FeatureEncoder batch (what the gate reads when tuning,
    # scoring and serving); on a split's samples it equals R_c of the training-time encoding.
    samples = prepared.samples("test")
    seq = prepared.sequences
    users = samples["user_id"].to_numpy()
    indices = seq.recent(users, samples["pos"].to_numpy(), 8)
    batch = FeatureEncoder(loaded.spec).encode(
        users,
        samples["item_id"].to_numpy(),
        samples["timestamp"].to_numpy(),
        seq.gather(users, indices, "item_ids"),
        seq.gather(users, indices, "ratings"),
    )
    chunk = next(iter_split(prepared, "test", loaded.spec, chunk_rows=len(samples)))
    with torch.no_grad():
        r_c = loaded.represent({k: torch.as_tensor(v) for k, v in batch.items()})
        trained_on = loaded.represent(
            {k: torch.as_tensor(v) for k, v in chunk.items() if k not in ("label", "sample_id")}
        )
    assert r_c.shape == (len(samples), loaded.d_c)
    torch.testing.assert_close(r_c, trained_on)


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(prepared, crm_cfg, tmp_path):
    model = make(prepared, crm_cfg, "din")
    save_crm(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CRMCheckpointError, match="model.safetensors is corrupt"):
        load_crm(tmp_path)
    weights.write_bytes(good)
    config = json.loads((tmp_path / "crm.json").read_text())
    config["hyperparameters"]["embed_dim"] = 4
    (tmp_path / "crm.json").write_text(json.dumps(config))
    with pytest.raises(CRMCheckpointError, match="does not match"):
        load_crm(tmp_path)
    (tmp_path / "crm.json").write_text("{not json")
    with pytest.raises(CRMCheckpointError, match="crm.json is not a valid CRM config"):
        load_crm(tmp_path)
    with pytest.raises(CRMCheckpointError, match="crm.json is missing"):
        load_crm(tmp_path / "nowhere")


def test_bad_model_hyperparameters_name_the_key(prepared, crm_cfg):
    heads = with_crm(crm_cfg, sim=dataclasses.replace(crm_cfg.crm.sim, heads=7))
    with pytest.raises(ConfigError, match="crm.sim.heads: 7 does not divide"):
        make(prepared, heads, "sim")
    heights = with_crm(crm_cfg, caser=dataclasses.replace(crm_cfg.crm.caser, horizontal_heights=[2, 50]))
    with pytest.raises(ConfigError, match="crm.caser.horizontal_heights"):
        make(prepared, heights, "caser")


def test_recent_mean_reads_only_the_last_present_behaviours():
    values = torch.arange(6, dtype=torch.float32).view(1, 6, 1).repeat(2, 1, 1)
    mask = torch.tensor([[True] * 6, [False, False, False, False, True, True]])
    assert recent_mean(values, mask, 3).squeeze(-1).tolist() == [4.0, 4.5]  # (3+4+5)/3, (4+5)/2
    assert recent_mean(values, torch.zeros_like(mask), 3).abs().sum() == 0  # no history: zeros


@pytest.mark.parametrize("name", ["sim", "din"])
def test_recent_k_widens_r_c_and_zero_leaves_it_out(prepared, crm_cfg, name):
    widths = {}
    for recent_k in (0, 5):
        widths[recent_k] = make(prepared, with_crm(crm_cfg, recent_k=recent_k), name).d_c
    assert widths[5] - widths[0] == make(prepared, with_crm(crm_cfg, recent_k=5), name).embedding.item_dim


def test_checkpoint_written_before_recent_k_existed_still_loads(prepared, crm_cfg, tmp_path):
    crm_cfg = with_crm(crm_cfg, recent_k=0)
    model = make(prepared, crm_cfg, "sim").eval()
    save_crm(model, tmp_path)
    config = json.loads((tmp_path / "crm.json").read_text())
    del config["hyperparameters"]["recent_k"]  # as checkpoints of earlier versions were written
    (tmp_path / "crm.json").write_text(json.dumps(config))
    loaded = load_crm(tmp_path)
    assert loaded.recent_k == 0 and loaded.d_c == model.d_c
    _, probs = predict_split(model, prepared, "test")
    np.testing.assert_allclose(predict_split(loaded, prepared, "test")[1], probs, rtol=1e-5, atol=1e-6)

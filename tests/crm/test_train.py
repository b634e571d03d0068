"""`reclora pretrain-crm` end to end on the fixture data: Ray Train with 2 CPU workers."""

import json
import math
import os

import psutil
import pytest

from reclora_ray.cli import main as cli_main
from reclora_ray.config import ConfigError, load_config
from reclora_ray.crm import load_crm
from reclora_ray.crm.predict import predict_split
from reclora_ray.crm.train import pretrain_crm
from reclora_ray.curves import CURVES_FILE, read_curves
from reclora_ray.data.prepared import PreparedData, PreparedDataError
from reclora_ray.metrics import binary_metrics
from reclora_ray.rundir import StageOutputExists
from tests.conftest import kill_one_train_worker


def train_cfg(*overrides):
    return load_config(
        "tiny",
        [
            "crm.num_workers=2",
            "crm.cpus_per_worker=0.5",
            "crm.batch_size=256",
            "crm.chunk_rows=1500",
            "crm.lr=5e-3",
            *overrides,
        ],
    )


@pytest.mark.ray
def test_pretrain_writes_a_loadable_checkpoint(ray_local, run_dir):
    cfg = train_cfg("crm.epochs=2", "crm.model=din")
    out = pretrain_crm(cfg, run_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"model", "auc", "logloss", "n_test"} <= set(metrics) and metrics["model"] == "din"
    assert [h["epoch"] for h in metrics["history"]] == [0, 1] and metrics["restarts"] == 0
    assert metrics["auc"] > 0.6
    assert not any(p.name.startswith(".") for p in (run_dir / "crm").iterdir())  # no Ray Train scratch left
    curves = read_curves(out / CURVES_FILE)  # every step's loss and lr, every epoch's validation
    steps = [r for r in curves if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(len(steps))) and len(steps) >= 2
    assert all(r["loss"] > 0 and r["lr"] == 5e-3 for r in steps)
    epochs = [r for r in curves if r["kind"] == "epoch"]
    assert [(r["epoch"], r["auc"]) for r in epochs] == [(h["epoch"], h["valid_auc"]) for h in metrics["history"]]
    assert list((run_dir / "tracking" / "crm-din").glob("events.out.tfevents.*"))

    model = load_crm(out)  # no Ray needed; the same predictions as the evaluation
    labels, probs = predict_split(model, PreparedData.load(run_dir / "data"), "test")
    assert binary_metrics(labels, probs)["auc"] == pytest.approx(metrics["auc"], abs=1e-6)
    assert json.loads((out / "crm.json").read_text())["d_c"] == model.d_c == metrics["d_c"]

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert pretrain_crm(cfg, run_dir) == out  # same config: a no-op
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(StageOutputExists, match="--overwrite"):
        pretrain_crm(train_cfg("crm.epochs=3", "crm.model=din"), run_dir)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.ray
def test_killed_worker_resumes_from_the_last_checkpoint(ray_local, run_dir):
    marker = run_dir / "killed.json"
    cfg = train_cfg("crm.epochs=3", "crm.patience=10", "crm.model=gru4rec", "crm.max_failures=1")
    out = pretrain_crm(cfg, run_dir, callbacks=[kill_one_train_worker(os.getpid(), marker)])
    killed = json.loads(marker.read_text())
    assert not psutil.pid_exists(killed["pid"])
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]  # every epoch once: resumed, not restarted
    assert history[0]["attempt"] == 0 and history[-1]["attempt"] == 1
    epochs = [(r["epoch"], r["attempt"]) for r in read_curves(out / CURVES_FILE) if r["kind"] == "epoch"]
    assert epochs[0] == (0, 0) and epochs[-1] == (2, 1)  # the restart appended to the same curves


def test_bad_inputs_fail_before_writing(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="crm.model: 'xgboost' is not one of"):
        train_cfg("crm.model=xgboost")
    with pytest.raises(ConfigError, match="crm.user_fields"):
        pretrain_crm(train_cfg("crm.user_fields=[salary]"), run_dir)
    with pytest.raises(FileNotFoundError, match="no prepare output yet; run `reclora prepare` first"):
        pretrain_crm(train_cfg(), tmp_path / "empty")
    with pytest.raises(PreparedDataError, match="prepared for dataset 'ml-100k', but the config asks for 'ml-1m'"):
        pretrain_crm(train_cfg("data.dataset=ml-1m"), run_dir)
    for split in ("train", "valid", "test"):
        (run_dir / "retrieval" / f"{split}.parquet").unlink()
    with pytest.raises(PreparedDataError, match="run `reclora retrieve"):
        pretrain_crm(train_cfg(), run_dir)
    assert not (run_dir / "crm").exists() and not (tmp_path / "empty" / "crm").exists()
    # the CLI turns these into one error line and exit status 2
    assert cli_main(["pretrain-crm", "--config", "tiny", "--model", "nope", "--out", str(run_dir)]) == 2


def test_a_planted_pickle_in_the_train_checkpoint_folder_is_not_executed(tmp_path):
    """OUT/crm/.ray-train-<model>/ survives a kill and is read by the next run: a pickle there
    must be refused, not run (issue 21, finding 6)."""
    import pickle

    import torch
    from ray.train import Checkpoint

    from reclora_ray.crm.checkpoint import CRMCheckpointError
    from reclora_ray.crm.train import TRAIN_STATE, load_train_state, train_state

    pwned = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {pwned}",))

    folder = tmp_path / "checkpoint_000000"
    folder.mkdir()
    with open(folder / TRAIN_STATE, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(CRMCheckpointError, match=r"train_state\.pt: refused, not a plain train state"):
        train_state(Checkpoint.from_directory(folder))
    assert not pwned.exists()

    # What training saves loads back under the same rule.
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    state = {"epoch": 1, "best_auc": -math.inf, "history": [{"epoch": 0, "valid_auc": float("nan")}]}
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state}, folder / TRAIN_STATE)
    loaded = load_train_state(folder / TRAIN_STATE)
    assert loaded["state"]["epoch"] == 1 and torch.equal(loaded["model"]["weight"], model.weight)
    torch.optim.AdamW(model.parameters(), lr=1e-3).load_state_dict(loaded["optimizer"])

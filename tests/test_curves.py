"""Training curves: the JSON lines, the TensorBoard event files, restarts and the report plot."""

import importlib.util
import json

import pytest

from reclora_ray.config import ConfigError, load_config
from reclora_ray.curves import CURVES_FILE, Curves, curves_config, keep_curves, plot_curves, read_curves


def test_rank_zero_writes_steps_and_epochs_and_the_tracker_gets_them(tmp_path):
    storage, out = tmp_path / "crm" / ".ray-train-sim", tmp_path
    config = curves_config("tensorboard", storage, out, "crm-sim")
    curves = Curves(config, rank=0)
    for loss in (0.9, 0.7, 0.6):
        curves.step(loss=loss, lr=1e-3)
    curves.epoch(0, auc=0.71, logloss=0.6, train_loss=float("nan"))
    curves.close()
    records = read_curves(storage / CURVES_FILE)
    assert [(r["kind"], r["step"]) for r in records] == [("step", 0), ("step", 1), ("step", 2), ("epoch", 3)]
    assert records[1] == {"kind": "step", "step": 1, "attempt": 0, "loss": 0.7, "lr": 1e-3}
    assert records[3]["epoch"] == 0 and records[3]["auc"] == 0.71

    events = list((out / "tracking" / "crm-sim").glob("events.out.tfevents.*"))
    assert len(events) == 1
    payload = events[0].read_bytes()
    assert b"train/loss" in payload and b"valid/auc" in payload and b"valid/train_loss" not in payload  # NaN left out

    Curves(config, rank=1).step(loss=5.0)  # other ranks write nothing
    assert len(read_curves(storage / CURVES_FILE)) == 4

    restarted = Curves(config, rank=0, attempt=1)  # a restart appends and keeps counting
    restarted.step(loss=0.5, lr=1e-3)
    restarted.close()
    last = read_curves(storage / CURVES_FILE)[-1]
    assert (last["step"], last["attempt"]) == (3, 1)

    (tmp_path / "final").mkdir()
    keep_curves(storage, tmp_path / "final")
    assert read_curves(tmp_path / "final" / CURVES_FILE) == read_curves(storage / CURVES_FILE)


def test_tracking_key_and_missing_tracker_packages_fail_early(tmp_path):
    assert load_config("tiny").tracking == "tensorboard"
    assert load_config("tiny", ["tracking=none"]).tracking == "none"
    with pytest.raises(ConfigError, match="tracking: 'tensorbord' is not one of"):
        load_config("tiny", ["tracking=tensorbord"])
    Curves(curves_config("none", tmp_path, tmp_path, "x"), rank=0).step(loss=1.0)
    assert not (tmp_path / "tracking").exists() and len(read_curves(tmp_path / CURVES_FILE)) == 1
    for tracker, package in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(ValueError, match=f"tracking: {tracker} needs the {package} package"):
                curves_config(tracker, tmp_path, tmp_path, "x")


def test_plot_shows_every_run_with_curves(tmp_path):
    assert not plot_curves(tmp_path, tmp_path / "curves.png")
    for kind, name in (("crm", "sim"), ("adapter", "reclora")):
        (tmp_path / kind / name).mkdir(parents=True)
        lines = [{"kind": "step", "step": i, "attempt": 0, "loss": 1 / (i + 1), "lr": 1e-3} for i in range(20)]
        lines += [
            {"kind": "epoch", "epoch": e, "step": 10 * e, "attempt": 0, "auc": 0.6 + e / 10, "logloss": 0.6}
            for e in range(2)
        ]
        (tmp_path / kind / name / CURVES_FILE).write_text("\n".join(map(json.dumps, lines)) + "\n")
    assert plot_curves(tmp_path, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

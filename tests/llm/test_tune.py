"""`reclora tune` on Ray Train + DeepSpeed (ZeRO-2, 2 CPU workers, gloo) and `reclora score`."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from reclora_ray.base_model import load_base
from reclora_ray.curves import CURVES_FILE, read_curves
from reclora_ray.llm.plora import load_adapter
from reclora_ray.llm.score import Scorer, score_variant
from reclora_ray.llm.tune import tune_variant
from reclora_ray.predictions import read_predictions
from reclora_ray.rundir import RunDir
from tests.conftest import kill_one_train_worker, tiny_config

pytestmark = pytest.mark.ray


def test_zero2_on_two_workers_resumes_after_a_killed_worker_and_scores(ray_local, tiny_run):
    cfg = tiny_config("tune.num_workers=2", "tune.epochs=2", "tune.max_failures=1", "tune.lr=5e-3")
    run = RunDir(tiny_run)
    marker = tiny_run / "killed.json"
    out = tune_variant(cfg, run, "reclora", callbacks=[kill_one_train_worker(os.getpid(), marker)])

    assert not psutil.pid_exists(json.loads(marker.read_text())["pid"])
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]  # resumed at epoch 1, not restarted
    assert [h["attempt"] for h in metrics["history"]] == [0, 1]
    assert metrics["few_shot"] == cfg.tune.few_shot and metrics["valid"] == cfg.tune.valid_subsample
    best = max(metrics["history"], key=lambda h: (h["val_auc"], h["epoch"]))
    assert metrics["best_epoch"] == best["epoch"] and metrics["best_val_auc"] == best["val_auc"]
    assert metrics["dtype"] == "float32"  # the tiny config's explicit llm.dtype, as the workers resolved it
    assert all(np.isfinite(h["train_loss"]) for h in metrics["history"])
    assert not (run.root / "adapter" / ".ray-train-reclora").exists()
    # The engine follows the linear schedule: every step's lr below the last one's (attempts in turn).
    steps = [r for r in read_curves(out / CURVES_FILE) if r["kind"] == "step" and "lr" in r]
    first_attempt = [r["lr"] for r in steps if r["attempt"] == 0]
    assert first_attempt[0] < cfg.tune.lr and all(a > b for a, b in zip(first_attempt, first_attempt[1:]))
    assert steps[-1]["lr"] < cfg.tune.lr * 0.05

    # The workers' stderr is no terminal: rank 0 printed one-line progress of its micro-batches and
    # its validation, and the restarted workers resumed from the checkpoint (safetensors + JSON).
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    printed = "\n".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err"))
    assert "resumed from the checkpoint of epoch 0" in printed
    for epoch in (0, 1):
        assert f"reclora epoch {epoch}: " in printed and f"reclora epoch {epoch} validation: " in printed
    assert " micro-batches (100%)" in printed and "samples (100%)" in printed

    base, _ = load_base(cfg.llm, device="cpu")
    adapter = load_adapter(base, out)
    assert all(layer.lora_B.abs().sum() > 0 for layer in adapter.lora_layers().values())  # it trained

    scores = score_variant(cfg, run, "reclora")
    preds = read_predictions(scores)
    test = pd.read_parquet(run.data / "samples" / "test.parquet")
    assert sorted(preds["sample_id"]) == sorted(test["sample_id"])
    gates = np.stack(preds["gate"].to_numpy())
    assert gates.shape == (len(test), cfg.lora.n_meta) and np.allclose(gates.sum(1), 1, atol=1e-5)
    reported = json.loads((scores / "metrics.json").read_text())
    assert reported["n"] == len(test) and 0 <= reported["auc"] <= 1 and reported["dtype"] == metrics["dtype"]

    # The batch path and a direct Scorer (the online service's core) agree sample by sample.
    from reclora_ray.llm.histories import load_samples
    from reclora_ray.variants import get_variant

    rows = load_samples(run.data, "test", get_variant("reclora")).iloc[:24]
    direct = Scorer(cfg, str(run.root), "reclora")(rows)
    expected = preds.set_index("sample_id").loc[direct["sample_id"], "p_yes"].to_numpy()
    np.testing.assert_allclose(direct["p_yes"].to_numpy(), expected, atol=1e-5)


def plant_pickle_then_kill_a_worker(driver_pid: int, marker: Path, pwned: Path):
    """A Ray Train callback: after the first checkpoint, a pickle that would `touch pwned` goes
    where DeepSpeed's own checkpoint keeps its module states, and one worker is SIGKILLed, so
    the restarted workers resume from that folder (defined in a function: shipped by value)."""
    import pickle
    import signal

    from ray.train import UserCallback

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {pwned}",))

    class PlantAndKill(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is None or marker.exists():
                return
            planted = Path(checkpoint.path) / "engine" / "mp_rank_00_model_states.pt"
            planted.parent.mkdir(parents=True, exist_ok=True)
            planted.write_bytes(pickle.dumps({"module": Payload()}))
            workers = [
                p
                for p in psutil.Process(driver_pid).children(recursive=True)
                if "RayTrainWorker" in " ".join(p.cmdline())
            ]
            marker.write_text(json.dumps({"pid": workers[-1].pid, "planted": str(planted)}))
            os.kill(workers[-1].pid, signal.SIGKILL)

    return PlantAndKill()


def test_a_pickle_planted_in_a_tune_checkpoint_stops_the_resume_unexecuted(ray_local, tiny_run, tmp_path):
    """OUT/adapter/.ray-train-<variant>/ outlives a killed run and is read by the next (issue 21):
    the workers restarted on a checkpoint holding a pickle refuse it by name; nothing runs."""
    cfg = tiny_config("tune.epochs=2", "tune.max_failures=1", "tracking=none")
    run = RunDir(tiny_run)
    marker, pwned = tmp_path / "planted.json", tmp_path / "pwned"
    with pytest.raises(Exception, match=r"mp_rank_00_model_states\.pt: refused, a tune checkpoint holds no pickle"):
        tune_variant(cfg, run, "reclora", callbacks=[plant_pickle_then_kill_a_worker(os.getpid(), marker, pwned)])
    assert json.loads(marker.read_text())["planted"]  # it was planted and a worker killed
    assert not pwned.exists()
    assert not (run.root / "adapter" / "reclora").exists()

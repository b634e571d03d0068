"""The tuning loop's worker side in one process, on a real DeepSpeed engine: the checkpoint without
pickle (issue 21: a resumed engine is the one saved; a checkpoint holding a pickle is refused,
never unpickled) and the progress lines of its epochs and validation (issue 20)."""

import io
import json
import logging
import os
import pickle
import socket
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from reclora_ray.llm.tune_state import (
    STATE_FILE,
    TRAINABLE,
    TuneCheckpointError,
    decode,
    encode,
    load_state,
    rank_files,
    read_state,
    save_state,
)


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, as Ray Train gives each worker (DeepSpeed reads LOCAL_RANK)."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def engine(seed: int, zero_stage: int):
    """A DeepSpeed engine as the tune stage builds it (its config, AdamW, the linear schedule): a
    frozen layer (the same in every engine, as the base LLM is) under trainable ones initialised
    from `seed`, with dropout so that the RNG state matters."""
    import deepspeed

    from reclora_ray.config import load_config
    from reclora_ray.llm.tune import deepspeed_config

    torch.manual_seed(0)
    frozen = torch.nn.Linear(6, 8).requires_grad_(False)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(frozen, torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    cfg = load_config(
        "tiny",
        [
            "tune.micro_batch=4",
            "tune.grad_accum=2",
            f"tune.zero_stage={zero_stage}",
            "tune.lr=1e-2",
            "tune.warmup_ratio=0.25",
        ],
    )
    ds, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        dist_init_required=False,
        config=deepspeed_config(cfg, 1, total_steps=20),
    )
    return ds


def train(ds, micro_batches: int, seed: int) -> list[float]:
    data = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(micro_batches):
        x, y = torch.randn(4, 6, generator=data), torch.randn(4, 1, generator=data)
        loss = torch.nn.functional.mse_loss(ds(x), y)
        ds.backward(loss)
        ds.step()
        losses.append(float(loss.detach()))
    return losses


def snapshot(ds) -> dict:
    tensors = {}
    optimizer = encode({k: v for k, v in ds.optimizer.state_dict().items() if k != "param_slice_mappings"}, tensors)
    with torch.no_grad():
        params = {n: p.detach().clone() for n, p in ds.module.named_parameters()}
    return {
        "params": params,
        "optimizer": json.dumps(optimizer),
        "tensors": tensors,
        "lr": ds.get_lr(),
        "steps": (ds.global_steps, ds.global_samples, ds.skipped_steps),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    assert a["optimizer"] == b["optimizer"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for key in a["tensors"]:
        assert torch.equal(a["tensors"][key], b["tensors"][key]), key
    assert a["lr"] == b["lr"] and a["steps"] == b["steps"]


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_resumed_engine_is_the_saved_one_and_trains_on_identically(process_group, tmp_path, zero_stage):
    first = engine(seed=0, zero_stage=zero_stage)
    train(first, 6, seed=1)  # 3 optimizer steps, warm-up over
    save_state(first, tmp_path, rank=0, world=1, extra={"history": [{"epoch": 0}]})
    saved, rng = snapshot(first), torch.get_rng_state()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted([STATE_FILE, *rank_files(0), *([TRAINABLE] if zero_stage < 3 else [])])

    second = engine(seed=42, zero_stage=zero_stage)  # other initial weights, a fresh optimizer
    assert not torch.equal(second.module[3].weight, first.module[3].weight) or zero_stage == 3
    state = load_state(second, tmp_path, rank=0, world=1)
    assert state["history"] == [{"epoch": 0}]
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout masks to come are the saved run's
    resumed = snapshot(second)
    if zero_stage < 3:
        assert_same(saved, resumed)
    else:  # ZeRO-3 partitions the parameters: compare what its optimizer holds
        assert resumed["optimizer"] == saved["optimizer"] and resumed["steps"] == saved["steps"]

    # Both go on the same: same losses and dropout masks (one process, one RNG: each starts from
    # the state restored above), same weights after.
    first_losses = train(first, 4, seed=2)
    torch.set_rng_state(rng)
    assert first_losses == train(second, 4, seed=2)
    if zero_stage < 3:
        assert_same(snapshot(first), snapshot(second))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_in_a_tune_checkpoint_is_refused_not_executed(process_group, tmp_path):
    """OUT/adapter/.ray-train-<variant>/ survives a kill and is read by the next run (issue 21)."""
    pwned = tmp_path / "pwned"
    ds = engine(seed=0, zero_stage=2)
    train(ds, 2, seed=1)

    # DeepSpeed's own checkpoint, as the stage wrote it before: a pickle, refused by name.
    legacy = tmp_path / "legacy"
    ds.save_checkpoint(str(legacy), tag="engine", exclude_frozen_parameters=True)
    (legacy / STATE_FILE).write_text(json.dumps({"history": [{"epoch": 0, "attempt": 0}]}))
    with pytest.raises(
        TuneCheckpointError,
        match=r"engine/mp_rank_00_model_states\.pt: refused, a tune checkpoint "
        r"holds no pickle",
    ):
        load_state(ds, legacy, rank=0, world=1)

    # A pickle planted beside a good checkpoint, or in place of one of its files.
    good = tmp_path / "good"
    good.mkdir()
    save_state(ds, good, rank=0, world=1, extra={"history": []})
    (good / "engine").mkdir()
    with open(good / "engine" / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump({"module": Payload(pwned)}, f)
    with pytest.raises(TuneCheckpointError, match=r"mp_rank_00_model_states\.pt: refused"):
        read_state(good)
    (good / "engine" / "mp_rank_00_model_states.pt").unlink()
    for name in (TRAINABLE, rank_files(0)[0]):
        original = (good / name).read_bytes()
        with open(good / name, "wb") as f:
            pickle.dump(Payload(pwned), f)
        with pytest.raises(TuneCheckpointError, match=rf"{name}: refused, not a safetensors file"):
            load_state(ds, good, rank=0, world=1)
        (good / name).write_bytes(original)
    with open(good / rank_files(0)[1], "wb") as f:
        pickle.dump(Payload(pwned), f)
    with pytest.raises(TuneCheckpointError, match=rf"{rank_files(0)[1]}: refused, not JSON"):
        load_state(ds, good, rank=0, world=1)
    assert not pwned.exists()


def test_the_codec_refuses_objects_both_ways(tmp_path):
    tensors = {}
    plain = {"state": {0: {"step": torch.tensor(3.0)}}, "betas": (0.9, 0.999), "nan": float("nan"), "n": None}
    back = decode(json.loads(json.dumps(encode(plain, tensors))), tensors, tmp_path / "x.json")
    assert back["state"][0]["step"] == 3.0 and back["betas"] == (0.9, 0.999) and back["nan"] != back["nan"]
    with pytest.raises(TypeError, match=r"state\.model: a .*Payload cannot be saved as plain data"):
        encode({"model": Payload(tmp_path / "p")}, {})
    with pytest.raises(TuneCheckpointError, match=r"x\.json: refused, .*__reduce__"):
        decode({"__reduce__": ["os.system", "touch"]}, {}, tmp_path / "x.json")
    with pytest.raises(TuneCheckpointError, match="refers to tensor 't9'"):
        decode({"$tensor": "t9"}, {}, tmp_path / "x.json")


class Regression:
    """A task of the tuning loop (the interface of tune.CTRTask) for the engine above: squared
    error of rows x0..x5 -> y."""

    valid_unit = "samples"
    empty = {"error": np.zeros(0, dtype=np.float32)}
    valid_chunk = 4

    def __init__(self, ds):
        self.ds = ds

    def _xy(self, rows):
        return (
            torch.tensor(rows[[f"x{i}" for i in range(6)]].to_numpy(), dtype=torch.float32),
            torch.tensor(rows[["y"]].to_numpy(), dtype=torch.float32),
        )

    def loss(self, ds, rows):
        x, y = self._xy(rows)
        return torch.nn.functional.mse_loss(ds(x), y)

    def score(self, rows):
        x, y = self._xy(rows)
        return {"error": ((self.ds(x) - y) ** 2).squeeze(1).numpy()}


def test_a_non_tty_tune_run_prints_periodic_one_line_progress(process_group, tmp_path, caplog, monkeypatch):
    from reclora_ray.console import Progress
    from reclora_ray.curves import CURVES_FILE, Curves, curves_config, read_curves
    from reclora_ray.llm.tune import epoch_rows, train_epoch, validate

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: log lines, no bar
    caplog.set_level(logging.INFO)
    log = logging.getLogger("reclora_ray.llm.tune")
    ds = engine(seed=0, zero_stage=2)
    task = Regression(ds)
    rng = np.random.default_rng(0)
    rows = pd.DataFrame(rng.normal(size=(34, 7)), columns=[*(f"x{i}" for i in range(6)), "y"])
    order = epoch_rows(len(rows), seed=0, epoch=0, rank=0, world=1, micro_batch=4)  # 8 whole micro-batches
    curves = Curves(curves_config("none", tmp_path, tmp_path, "x"), rank=0)

    losses = train_epoch(ds, task, rows, order, 4, curves, Progress(log, "demo epoch 0", 8, "micro-batches", 0.0))
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    # every_s=0: a line each fifth of the epoch (every 2 of 8 micro-batches), the last one's at the end
    assert len(losses) == 8 and len(lines) == 4
    assert all("\n" not in line for line in lines)
    for k, line in zip((2, 4, 6), lines[:3]):
        assert line.startswith(f"demo epoch 0: {k}/8 micro-batches ({100 * k / 8:.0f}%), ")
        assert f"loss {np.mean(losses[max(0, k - 10) : k]):.4f}, lr " in line
        assert " micro-batches/s, ETA " in line
    assert lines[3].startswith("demo epoch 0: 8/8 micro-batches (100%)") and lines[3].endswith(
        f"loss {np.mean(losses):.4f}"
    )
    assert [r["loss"] for r in read_curves(tmp_path / CURVES_FILE)] == pytest.approx(losses)

    caplog.clear()
    scored = validate(ds, task, rows.iloc[:10], Progress(log, "demo epoch 0 validation", 10, "samples", 0.0))
    assert scored["error"].shape == (10,) and np.isfinite(scored["error"]).all()
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert [line.split(",")[0] for line in lines] == [
        f"demo epoch 0 validation: {n}/10 samples ({n * 10}%)" for n in (4, 8, 10)
    ]

    caplog.clear()  # rate-limited as in a real run (every 30 s): a short epoch prints its end only
    train_epoch(ds, task, rows, order, 4, curves, Progress(log, "demo epoch 1", 8, "micro-batches", 30.0))
    assert [r.getMessage().split(",")[0] for r in caplog.records if r.name == log.name] == [
        "demo epoch 1: 8/8 micro-batches (100%)"
    ]
    curves.close()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_the_adapter_of_a_zero3_engine_is_saved_whole(process_group, tmp_path, zero_stage):
    """ZeRO-3 holds a slice of every parameter per rank: rank 0 alone wrote empty tensors."""
    import deepspeed

    from reclora_ray.config import LoRAConfig, load_config
    from reclora_ray.llm.plora import PersonalizedLoRAModel, load_adapter, trainable_state_dict
    from reclora_ray.llm.tune import deepspeed_config
    from reclora_ray.llm.tune_state import save_engine_adapter
    from tests.llm.conftest import CRM_DIM, randomize_lora_b, tiny_llama

    model = PersonalizedLoRAModel(tiny_llama(), LoRAConfig(n_meta=2, target_modules=["q_proj", "v_proj"]), CRM_DIM)
    randomize_lora_b(model)
    expected = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    cfg = load_config("tiny", [f"tune.zero_stage={zero_stage}"])
    ds, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        dist_init_required=False,
        config=deepspeed_config(cfg, 1, total_steps=4),
    )
    save_engine_adapter(ds, tmp_path / "adapter", rank=0)
    restored = trainable_state_dict(load_adapter(tiny_llama(), tmp_path / "adapter"))
    assert restored.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(restored[name], tensor, rtol=0, atol=0, msg=name)

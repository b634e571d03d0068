import numpy as np
import pandas as pd
import pytest
import torch

from reclora_ray.config import ConfigError, load_config
from reclora_ray.llm.tune import (
    best_epoch,
    deepspeed_config,
    engine_precision,
    epoch_rows,
    few_shot_sample,
    lr_schedule,
)


def test_batch_sizes_and_zero_stage_follow_the_config():
    cfg = load_config("tiny", ["tune.micro_batch=4", "tune.grad_accum=8", "tune.zero_stage=1"])
    ds = deepspeed_config(cfg, world_size=3, total_steps=10)
    assert ds["train_batch_size"] == 4 * 8 * 3 and ds["zero_optimization"]["stage"] == 1


def test_the_engine_keeps_the_adapter_fp32_over_bf16_and_8bit_bases():
    cfg = load_config("tiny")
    assert engine_precision(cfg, "bfloat16") == "float32"
    ds = deepspeed_config(cfg, 1, 5, engine_precision(cfg, "bfloat16"))
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    eight_bit = load_config("tiny", ["llm.load_in_8bit=true"])
    assert engine_precision(eight_bit, "float16") == "float32"
    fp16 = deepspeed_config(cfg, 1, 5, engine_precision(cfg, "float16"))  # loss scaling for fp16 gradients
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0


def lrs_over(cfg, total_steps: int) -> list[float]:
    """The lr of each optimizer step under lr_schedule, on a real optimizer."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.tune.lr)
    schedule = lr_schedule(cfg, total_steps)(optimizer)
    lrs = []
    for _ in range(total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_the_schedule_is_linear_without_a_forced_warm_up():
    lrs = lrs_over(load_config("tiny", ["tune.lr=2e-3"]), total_steps=100)
    assert lrs[0] == pytest.approx(2e-3)  # step 0 already at lr
    assert lrs[50] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(2e-5)  # decays to 0, never held
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    warm = lrs_over(load_config("tiny", ["tune.lr=2e-3", "tune.warmup_ratio=0.1"]), total_steps=100)
    assert warm[0] == 0.0 and warm[5] == pytest.approx(1e-3) and max(warm) == pytest.approx(2e-3) == warm[10]
    with pytest.raises(ConfigError, match="warmup_ratio"):
        load_config("tiny", ["tune.warmup_ratio=1.5"])


def test_each_epoch_is_a_new_seeded_permutation_dealt_to_the_ranks():
    n, world, mb = 1000, 2, 8
    epoch0 = [epoch_rows(n, 42, 0, rank, world, mb) for rank in range(world)]
    assert all(len(r) == len(epoch0[0]) and len(r) % mb == 0 for r in epoch0)  # the engines step together
    together = np.concatenate(epoch0)
    assert len(np.unique(together)) == len(together) >= n - world * mb
    assert np.array_equal(epoch_rows(n, 42, 0, 1, world, mb), epoch0[1])  # fixed by the seed
    epoch1 = epoch_rows(n, 42, 1, 0, world, mb)
    assert not np.array_equal(epoch1, epoch0[0])  # a new order every epoch
    assert abs(np.corrcoef(epoch0[0], np.arange(len(epoch0[0])))[0, 1]) < 0.1  # no trace of the input order


def test_a_time_ordered_few_shot_set_reaches_the_batches_shuffled():
    # The few-shot set comes in time order (users in runs, labels drifting): batches must mix users.
    users = np.repeat(np.arange(64), 32)
    train = few_shot_sample(pd.DataFrame({"user_id": users, "label": np.arange(len(users)) < 1200}), 1024, seed=0)
    rows = train.iloc[epoch_rows(len(train), 0, 0, 0, 1, 8)]
    same_user = np.mean(rows["user_id"].to_numpy()[1:] == rows["user_id"].to_numpy()[:-1])
    assert same_user < 0.05
    last_quarter = rows["label"].to_numpy()[-len(rows) // 4 :].mean()
    assert abs(last_quarter - train["label"].mean()) < 0.08


def test_the_best_epoch_is_chosen_on_validation_not_last():
    history = [
        {"epoch": 0, "val_auc": 0.61},
        {"epoch": 1, "val_auc": 0.66},
        {"epoch": 2, "val_auc": 0.64},
        {"epoch": 3, "val_auc": float("nan")},
    ]
    assert best_epoch(history)["epoch"] == 1
    with pytest.raises(ValueError):
        best_epoch([])
    # A tie goes to the latest epoch, whose checkpoint Ray keeps (num_to_keep=2 of three tied).
    tied = [{"epoch": e, "val_hr1": 0.3} for e in range(3)]
    assert best_epoch(tied, "val_hr1")["epoch"] == 2
    assert best_epoch([{"epoch": e, "val_auc": float("nan")} for e in range(3)])["epoch"] == 2


def test_few_shot_sample_is_uniform_fixed_and_bounded():
    train = pd.DataFrame({"sample_id": range(1000)})
    a, b = few_shot_sample(train, 100, seed=1), few_shot_sample(train, 100, seed=1)
    assert a.equals(b) and len(a) == 100 and a["sample_id"].is_unique
    assert not a.equals(few_shot_sample(train, 100, seed=2))
    assert a["sample_id"].max() > 800 and a["sample_id"].min() < 200  # drawn across the split
    assert len(few_shot_sample(train, 5000, seed=1)) == 1000

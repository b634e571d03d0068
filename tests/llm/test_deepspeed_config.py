from reclora_ray.config import load_config
from reclora_ray.llm.tune import deepspeed_config, few_shot_sample


def test_precision_batch_and_schedule_follow_the_config():
    cfg = load_config("tiny", ["llm.dtype=bfloat16", "tune.micro_batch=4", "tune.grad_accum=8", "tune.zero_stage=1"])
    ds = deepspeed_config(cfg, world_size=3, total_steps=10)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["train_batch_size"] == 4 * 8 * 3 and ds["zero_optimization"]["stage"] == 1
    assert ds["scheduler"]["params"]["warmup_num_steps"] >= 1  # DeepSpeed rejects 0


def test_an_8bit_base_trains_in_an_fp32_engine():
    cfg = load_config("tiny", ["llm.dtype=float16", "llm.load_in_8bit=true"])
    ds = deepspeed_config(cfg, world_size=1, total_steps=5)
    assert not ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]


def test_few_shot_sample_is_uniform_fixed_and_bounded():
    import pandas as pd

    train = pd.DataFrame({"sample_id": range(1000)})
    a, b = few_shot_sample(train, 100, seed=1), few_shot_sample(train, 100, seed=1)
    assert a.equals(b) and len(a) == 100 and a["sample_id"].is_unique
    assert not a.equals(few_shot_sample(train, 100, seed=2))
    assert a["sample_id"].max() > 800 and a["sample_id"].min() < 200  # drawn across the split
    assert len(few_shot_sample(train, 5000, seed=1)) == 1000

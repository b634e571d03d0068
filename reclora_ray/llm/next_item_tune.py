"""Tuning on the next-item task: the answer is the target's title, the loss on its tokens only.

The same Ray Train + DeepSpeed setup as `reclora tune` (reclora_ray/llm/tune.py: its DeepSpeed
config, few-shot sample and fingerprint): each worker runs an engine over the trainable gate and
LoRA parameters; every epoch is validated (HR@1 over the 20 candidates, by candidate likelihood)
and checkpointed, a killed worker resumes from the last checkpoint. The few-shot set is drawn
from OUT/data/next_item/train.parquet; the adapter lands in OUT/next-item/adapter/<variant>/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from reclora_ray.config import Config
from reclora_ray.llm.histories import fixed_subsample
from reclora_ray.llm.next_item_score import adapter_dir, load_rows
from reclora_ray.llm.tune import (STATE_FILE, deepspeed_config, engine_precision, epoch_rows, few_shot_sample,
                                  fingerprint, lr_schedule)
from reclora_ray.llm.variants import crm_name, get_variant
from reclora_ray.rundir import RunDir, check_can_write, staged_output, write_json_atomic
from reclora_ray.runtime import init_ray, save_resolved_config

log = logging.getLogger(__name__)

SCORE_KEY = "val_hr1"


def train_loop_per_worker(loop_config: dict) -> None:
    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from reclora_ray.data.prepared import PreparedData
    from reclora_ray.llm.base import dtype_name, resolve_dtype
    from reclora_ray.llm.inputs import to_device
    from reclora_ray.llm.model import build_model
    from reclora_ray.llm.next_item_score import candidate_scores, model_inputs
    from reclora_ray.llm.plora import unwrap
    from reclora_ray.ranking import per_row_metrics, target_ranks

    cfg: Config = loop_config["cfg"]
    variant = get_variant(loop_config["variant"])
    run = RunDir(loop_config["out"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)

    data = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
    model, tokenizer, crm_spec = build_model(cfg, run, variant, device=device)
    inputs, features = model_inputs(cfg, data, tokenizer, variant, crm_spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    precision = engine_precision(cfg, dtype_name(resolve_dtype(cfg.llm.dtype, device)))
    engine, *_ = deepspeed.initialize(model=model.llm, model_parameters=trainable, dist_init_required=False,
                                      config=deepspeed_config(cfg, world, loop_config["total_steps"], precision),
                                      lr_scheduler=lr_schedule(cfg, loop_config["total_steps"]))
    train, valid = ray.get(loop_config["train"]), ray.get(loop_config["valid"]).iloc[rank::world]
    history, attempt = [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag="engine", load_module_strict=False)
            history = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())["history"]
        attempt = history[-1]["attempt"] + 1

    mb = cfg.tune.micro_batch
    for epoch in range(len(history), cfg.tune.epochs):
        engine.train()
        losses = []
        order = epoch_rows(len(train), cfg.run.seed, epoch, rank, world, mb)
        for start in range(0, len(order), mb):
            rows = train.iloc[order[start:start + mb]]
            users, pos = rows["user_id"].to_numpy(), rows["pos"].to_numpy()
            cands = np.stack(rows["candidates"].to_numpy())
            batch = to_device(inputs.training_batch(users, pos, cands, rows["target_index"].to_numpy()), device)
            crm_repr = None
            if features is not None:
                feats = features.without_target(users, pos, rows["timestamp"].to_numpy())
                crm_repr = model.crm_repr(to_device(feats, device))
            loss = engine(**batch, crm_repr=crm_repr).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))

        engine.eval()
        ranks = []
        for begin in range(0, len(valid), cfg.score.batch_size * 4):
            rows = valid.iloc[begin:begin + cfg.score.batch_size * 4]
            scores = candidate_scores(model, inputs, features, rows, cfg.score.batch_size, device)
            ranks.append(target_ranks(scores, rows["target_index"].to_numpy()))
        gathered = [None] * world
        dist.all_gather_object(gathered, np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64))
        valid = per_row_metrics(np.concatenate(gathered))
        metrics = {"epoch": epoch, "attempt": attempt, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   SCORE_KEY: float(valid["hr@1"].mean()), "val_ndcg10": float(valid["ndcg@10"].mean())}
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag="engine", exclude_frozen_parameters=True)
            if rank == 0:
                unwrap(engine.module).save_adapter(Path(tmp) / "adapter")
                (Path(tmp) / STATE_FILE).write_text(json.dumps({"history": history}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if rank == 0:
            log.info("next-item epoch %d: train loss %.4f, valid HR@1 %.4f, NDCG@10 %.4f",
                     epoch, metrics["train_loss"], metrics[SCORE_KEY], metrics["val_ndcg10"])


def tune_next_item(cfg: Config, run: RunDir, variant_name: str, overwrite: bool = False) -> Path:
    """Tune one variant on the next-item task -> OUT/next-item/adapter/<variant> (skipped when done)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    variant = get_variant(variant_name)
    if variant.adapter is None:
        raise ValueError(f"variant {variant.name!r} has nothing to tune")
    cfg = dataclasses.replace(cfg, tune=variant.tune_config(cfg.tune))
    out = adapter_dir(run, variant.name)
    fp = f"next-item-{fingerprint(cfg, variant)}"
    if not check_can_write(out, fp, overwrite):
        return out
    if variant.uses_crm and not (run.crm(crm_name(cfg, variant)) / "crm.json").exists():
        raise FileNotFoundError(f"{run.crm(crm_name(cfg, variant))} holds no CRM; run `reclora pretrain-crm` first")
    train = few_shot_sample(load_rows(run, "train"), cfg.tune.few_shot, cfg.run.seed)
    valid = fixed_subsample(load_rows(run, "valid"), cfg.tune.valid_subsample, cfg.run.seed)
    world = cfg.tune.num_workers
    total_steps = max(1, (len(train) // world) // cfg.tune.micro_batch // cfg.tune.grad_accum) * cfg.tune.epochs
    log.info("tuning %s on the next-item task: %d few-shot sequences, %d validation sequences, %d optimizer steps",
             variant.name, len(train), len(valid), total_steps)

    init_ray(cfg)
    storage = (run.root / "next-item" / "adapter" / f".ray-train-{variant.name}").resolve()
    trainer = TorchTrainer(
        train_loop_per_worker,
        # As tune.py: each worker takes its share of a new permutation of the fixed set every epoch.
        train_loop_config={"cfg": cfg, "variant": variant.name, "out": str(run.root.resolve()),
                           "total_steps": total_steps, "train": ray.put(train), "valid": ray.put(valid)},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=cfg.tune.use_gpu),
        run_config=RunConfig(name=f"tune-{fp}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.tune.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=SCORE_KEY,
                                                                checkpoint_score_order="max")),
    )
    result = trainer.fit()
    best_checkpoint, best = max(result.best_checkpoints, key=lambda cm: cm[1][SCORE_KEY])
    with best_checkpoint.as_directory() as ckpt_dir, staged_output(out, fp, {"variant": variant.name}) as tmp:
        shutil.copytree(Path(ckpt_dir) / "adapter", tmp, dirs_exist_ok=True)
        history = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())["history"]
        summary = {"best_epoch": best["epoch"], f"best_{SCORE_KEY}": best[SCORE_KEY], "few_shot": len(train),
                   "history": history}
        write_json_atomic(tmp / "train_metrics.json", summary)
        save_resolved_config(cfg, tmp)
    shutil.rmtree(storage, ignore_errors=True)
    log.info("next-item %s: best epoch %d (valid HR@1 %.4f) -> %s", variant.name, best["epoch"], best[SCORE_KEY], out)
    return out

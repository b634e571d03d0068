"""`reclora tune`: Few2Many stage 2 on Ray Train + DeepSpeed.

The base LLM and the pretrained CRM stay frozen; only the gate and the meta-LoRAs (or the
plain LoRA of a baseline variant) train, on a few-shot sample of the training split. Each Ray
Train worker runs a DeepSpeed engine (ZeRO stage, precision, micro-batch and accumulation from
`tune`/`llm`; gloo on CPU, NCCL on GPU, using the process group Ray Train sets up). Every epoch
is validated (AUC on a fixed validation subsample) and checkpointed (trainable parameters and
their optimizer state only); a failed run resumes from its last checkpoint. The best epoch's
adapter lands in OUT/adapter/<variant>/.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from reclora_ray.cli import add_common_arguments
from reclora_ray.config import Config
from reclora_ray.data.prepared import PreparedData
from reclora_ray.llm.histories import load_samples
from reclora_ray.llm.variants import Variant, crm_name, get_variant
from reclora_ray.rundir import RunDir, check_can_write, staged_output, write_json_atomic
from reclora_ray.runtime import config_from_args, init_ray, save_resolved_config

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
LOG_EVERY = 10  # micro-batches between progress lines


def fingerprint(cfg: Config, variant: Variant) -> str:
    sections = ["data", "retrieve", "llm", "lora", "tune", "run"]
    if variant.uses_crm or variant.needs_retrieval:
        sections += ["embed", "crm"]
    return f"{variant.name}-{cfg.section_hash(*sections)}"


def deepspeed_config(cfg: Config, world_size: int, total_steps: int) -> dict:
    t = cfg.tune
    # DeepSpeed's half-precision modes cast the whole module, which would turn 8-bit weights into
    # numbers; an 8-bit base already computes in llm.dtype, so its engine keeps the adapter fp32.
    precision = "float32" if cfg.llm.load_in_8bit else cfg.llm.dtype
    warmup = max(1, int(t.warmup_ratio * total_steps))  # DeepSpeed requires >= 1
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay, "torch_adam": True}},
        "scheduler": {  # linear warm-up then linear decay to 0, the paper's "linear scheduler"
            "type": "WarmupDecayLR",
            "params": {"total_num_steps": max(total_steps, 1), "warmup_num_steps": warmup,
                       "warmup_min_lr": 0.0, "warmup_max_lr": t.lr, "warmup_type": "linear"},
        },
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": precision == "bfloat16"},
        "fp16": {"enabled": precision == "float16", "loss_scale": 0, "initial_scale_power": 16},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: a DeepSpeed engine over this worker's shard of the few-shot set."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from reclora_ray.llm.collate import p_yes
    from reclora_ray.llm.inputs import InputBuilder, to_device
    from reclora_ray.llm.model import build_model
    from reclora_ray.llm.plora import unwrap
    from reclora_ray.metrics import binary_metrics

    cfg: Config = loop_config["cfg"]
    variant = get_variant(loop_config["variant"])
    run = RunDir(loop_config["out"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)

    data = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
    model, tokenizer, crm_spec = build_model(cfg, run, variant, device=device)
    if cfg.tune.gradient_checkpointing:
        unwrap(model.llm).activation_checkpointing_enable()
    inputs = InputBuilder(cfg, data, variant, tokenizer, crm_spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The engine owns the LLM only: the frozen CRM stays outside, in its own precision, and
    # out of the optimizer and the checkpoints.
    engine, *_ = deepspeed.initialize(
        model=model.llm, model_parameters=trainable, dist_init_required=False,
        config=deepspeed_config(cfg, world, loop_config["total_steps"]),
    )

    history, attempt = [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag="engine", load_module_strict=False)
            history = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())["history"]
        attempt = history[-1]["attempt"] + 1
        log.info("rank %d resumed from the checkpoint of epoch %d", rank, history[-1]["epoch"])
    start_epoch = len(history)

    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    for epoch in range(start_epoch, cfg.tune.epochs):
        engine.train()
        losses = []
        for rows in train_shard.iter_batches(batch_size=cfg.tune.micro_batch, batch_format="pandas",
                                             drop_last=True, local_shuffle_buffer_size=cfg.tune.micro_batch * 8,
                                             local_shuffle_seed=cfg.run.seed + epoch):
            batch = to_device(inputs.training_batch(rows), device)
            crm_repr = model.crm_repr(batch.pop("crm_features"))
            loss = engine(**batch, crm_repr=crm_repr).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            if rank == 0 and len(losses) % LOG_EVERY == 0:
                log.info("epoch %d: %d/%d micro-batches, loss %.4f (last %d)", epoch, len(losses),
                         loop_config["micro_batches_per_epoch"], np.mean(losses[-LOG_EVERY:]), LOG_EVERY)

        engine.eval()
        labels, probs = [], []
        collator = inputs.collator
        for rows in valid_shard.iter_batches(batch_size=cfg.score.batch_size * 8, batch_format="pandas"):
            hist = inputs.histories(rows)
            batches = inputs.scoring_batches(rows["user_id"].to_numpy(), rows["item_id"].to_numpy(),
                                             rows["timestamp"].to_numpy(), hist, cfg.score.batch_size)
            for index, batch in batches:
                logits = model.last_logits(**to_device(batch, device))  # model.llm is engine.module
                probs.append(p_yes(logits, collator.yes_id, collator.no_id).cpu().numpy())
                labels.append(rows["label"].to_numpy()[index])
        gathered = [None] * world
        dist.all_gather_object(gathered, (np.concatenate(labels), np.concatenate(probs)))
        valid = binary_metrics(np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered]))
        metrics = {"epoch": epoch, "attempt": attempt, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   "val_auc": valid["auc"], "val_logloss": valid["logloss"]}
        history.append(metrics)

        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag="engine", exclude_frozen_parameters=True)
            if rank == 0:
                unwrap(engine.module).save_adapter(Path(tmp) / "adapter")
                (Path(tmp) / STATE_FILE).write_text(json.dumps({"history": history}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if rank == 0:
            log.info("epoch %d: train loss %.4f, valid AUC %.4f, logloss %.4f",
                     epoch, metrics["train_loss"], metrics["val_auc"], metrics["val_logloss"])


def tune_variant(cfg: Config, run: RunDir, variant_name: str, overwrite: bool = False,
                 callbacks: list | None = None) -> Path:
    """Tune one variant; returns OUT/adapter/<variant> (skipped when already done).

    `callbacks`: extra Ray Train `UserCallback`s (run on the Ray Train controller)."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    variant = get_variant(variant_name)
    if variant.adapter is None:
        raise ValueError(f"variant {variant.name!r} has nothing to tune")
    out = run.adapter(variant.name)
    fp = fingerprint(cfg, variant)
    if not check_can_write(out, fp, overwrite):
        return out
    if variant.uses_crm and not (run.crm(crm_name(cfg, variant)) / "crm.json").exists():
        raise FileNotFoundError(f"{run.crm(crm_name(cfg, variant))} holds no CRM; run `reclora pretrain-crm` first")

    train = few_shot_sample(load_samples(run.data, "train", variant), cfg.tune.few_shot, cfg.run.seed)
    valid = load_samples(run.data, "valid", variant)
    if cfg.tune.valid_subsample and cfg.tune.valid_subsample < len(valid):
        valid = valid.sample(n=cfg.tune.valid_subsample, random_state=cfg.run.seed).reset_index(drop=True)
    world = cfg.tune.num_workers
    steps_per_epoch = len(train) // (cfg.tune.micro_batch * cfg.tune.grad_accum * world)
    total_steps = max(1, steps_per_epoch) * cfg.tune.epochs
    log.info("tuning %s (%s) on %d few-shot samples, %d validation samples, %d worker(s), %d optimizer steps",
             variant.name, variant.description, len(train), len(valid), world, total_steps)

    init_ray(cfg)
    # Kept until the adapter is written: re-running the same command after a crash resumes here.
    storage = (run.root / "adapter" / f".ray-train-{variant.name}").resolve()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "variant": variant.name, "out": str(run.root.resolve()),
                           "total_steps": total_steps, "micro_batches_per_epoch": len(train) // (cfg.tune.micro_batch * world)},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=cfg.tune.use_gpu),
        datasets={"train": ray.data.from_pandas(train), "valid": ray.data.from_pandas(valid)},
        run_config=RunConfig(
            name=f"tune-{fp}", storage_path=str(storage), callbacks=callbacks or [],
            failure_config=FailureConfig(max_failures=cfg.tune.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_auc",
                                               checkpoint_score_order="max"),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt_dir:
        history = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())["history"]
    best = max(history, key=lambda h: -math.inf if math.isnan(h["val_auc"]) else h["val_auc"])
    best_checkpoint = next(c for c, m in result.best_checkpoints if m["epoch"] == best["epoch"])
    with best_checkpoint.as_directory() as ckpt_dir, staged_output(out, fp, {"variant": variant.name}) as tmp:
        shutil.copytree(Path(ckpt_dir) / "adapter", tmp, dirs_exist_ok=True)
        write_json_atomic(tmp / "train_metrics.json", {"best_epoch": best["epoch"], "best_val_auc": best["val_auc"],
                                                       "few_shot": len(train), "history": history})
        save_resolved_config(cfg, tmp)
    shutil.rmtree(storage, ignore_errors=True)
    log.info("best epoch %d (valid AUC %.4f) -> %s", best["epoch"], best["val_auc"], out)
    return out


def few_shot_sample(train: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """The paper's few-shot set: n training samples drawn uniformly without replacement, fixed
    by the seed (the whole split when n exceeds it)."""
    if n >= len(train):
        return train.reset_index(drop=True)
    keep = np.sort(np.random.default_rng(seed).choice(len(train), size=n, replace=False))
    return train.iloc[keep].reset_index(drop=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--variant", action="append", help="variant(s) to tune (default: tune.variants)")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run = RunDir(args.out)
    for name in args.variant or [v for v in cfg.tune.variants if get_variant(v).adapter]:
        tune_variant(cfg, run, name, overwrite=args.overwrite)
    return 0

"""`reclora tune`: Few2Many stage 2 on Ray Train + DeepSpeed.

The base LLM and the pretrained CRM stay frozen; only the gate and the meta-LoRAs (or the
plain LoRA of a baseline variant) train, on a few-shot sample of the training split. Each Ray
Train worker runs a DeepSpeed engine (ZeRO stage, precision, micro-batch and accumulation from
`tune`/`llm`; gloo on CPU, NCCL on GPU, using the process group Ray Train sets up). Every epoch
is validated (AUC on a fixed validation subsample) and checkpointed (trainable parameters, their
optimizer state, the schedule and the step counters, as safetensors + JSON: tune_state.py; nothing
in a checkpoint is unpickled); a failed run resumes from its last checkpoint. The best epoch's
adapter lands in OUT/adapter/<variant>/. Rank 0 shows the rate and ETA of each epoch's
micro-batches and of its validation (console.Progress). fit_adapter and the loop are
task-agnostic: the CTR task is CTRTask below, the next-item task next_item_tune.NextItemTask.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from reclora_ray.config import Config
from reclora_ray.console import Progress
from reclora_ray.curves import Curves, curves_config, keep_curves
from reclora_ray.data.prepared import PreparedData
from reclora_ray.llm.histories import fixed_subsample, load_samples
from reclora_ray.llm.tune_state import load_state, read_state, save_engine_adapter, save_state
from reclora_ray.rundir import RunDir, write_json_atomic
from reclora_ray.runtime import init_ray
from reclora_ray.stages import StageRun
from reclora_ray.variants import Variant, get_variant

log = logging.getLogger(__name__)

LOSS_WINDOW = 10  # micro-batches in the running loss that the progress lines show


def deepspeed_config(cfg: Config, world_size: int, total_steps: int, precision: str = "float32") -> dict:
    """The engine over the trainable gate and (meta-)LoRAs. `precision` is the engine's: fp32 keeps
    the adapter, its gradients and its optimizer state in fp32 over a bf16 or 8-bit base (see
    engine_precision); "float16" turns on DeepSpeed's fp16 mode with dynamic loss scaling. The
    learning-rate schedule is `lr_schedule`'s; `total_steps` sizes nothing here."""
    t = cfg.tune
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": False},
        "fp16": {"enabled": precision == "float16", "loss_scale": 0, "initial_scale_power": 16},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_schedule(cfg: Config, total_steps: int):
    """The paper's linear schedule, for `deepspeed.initialize(lr_scheduler=...)`: a linear warm-up
    from 0 over tune.warmup_ratio of the steps (none by default: the first step is at tune.lr),
    then a linear decay to 0 at the last step. (DeepSpeed's WarmupDecayLR decays to its warm-up
    start, so without a warm-up it would hold the lr constant.)"""
    from transformers import get_linear_schedule_with_warmup

    warmup = int(cfg.tune.warmup_ratio * total_steps)
    return lambda optimizer: get_linear_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))


def engine_precision(cfg: Config, base_dtype: str) -> str:
    """fp32 for the engine over a bf16 or fp32 base: the adapter is a few MB, so fp32 master
    weights cost nothing, and the base stays in its own dtype (the layers compute in it). DeepSpeed's
    bf16 mode would cast the whole module, the gate and an 8-bit base included. An fp16 base
    (no 8-bit) takes DeepSpeed's fp16 mode for its loss scaling, which fp16 gradients need."""
    return "float16" if base_dtype == "float16" and not cfg.llm.load_in_8bit else "float32"


def epoch_rows(n: int, seed: int, epoch: int, rank: int, world: int, micro_batch: int) -> np.ndarray:
    """This rank's rows of the few-shot set for one epoch, in training order.

    A new seeded permutation of the whole set every epoch (the set is fixed, so its time order
    must not survive into the batches), dealt to the ranks in turn; every rank gets the same
    number of whole micro-batches, as the engines step together."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = (n // world) // micro_batch * micro_batch
    return order[rank::world][:per_rank]


class CTRTask:
    """The CTR task of the tuning loop: Yes/No on the paper's prompt, validated by AUC.

    A task gives the loop (train_loop_per_worker) what differs between tasks: the loss of a
    micro-batch of its rows, the scores of a chunk of validation rows (arrays, gathered from every
    rank), the epoch's validation metrics from them, and how to show them. Engine, DeepSpeed
    config, shuffling, resume, checkpoints and progress are the loop's."""

    valid_unit = "samples"
    score_key = "val_auc"  # the validation figure that picks the epoch kept
    purpose = ""  # what the tuning line says the variant is tuned for, after its description
    empty = {"labels": np.zeros(0), "probs": np.zeros(0, dtype=np.float32)}

    def __init__(self, cfg: Config, data: PreparedData, variant: Variant, model, tokenizer, crm_spec, device):
        from reclora_ray.llm.inputs import InputBuilder

        self.cfg, self.model, self.device = cfg, model, device
        self.inputs = InputBuilder(cfg, data, variant, tokenizer, crm_spec)
        self.answer_ids = self.inputs.collator.yes_no
        self.valid_chunk = cfg.score.batch_size * 8

    def loss(self, engine, rows: pd.DataFrame):
        from reclora_ray.llm.inputs import to_device
        from reclora_ray.llm.model import training_loss

        batch = to_device(self.inputs.training_batch(rows), self.device)
        crm_repr = self.model.crm_repr(batch.pop("crm_features"))
        return training_loss(engine, batch, crm_repr, self.cfg.tune.loss, self.answer_ids)

    def score(self, rows: pd.DataFrame) -> dict[str, np.ndarray]:
        from reclora_ray.llm.collate import p_yes
        from reclora_ray.llm.inputs import to_device

        hist = self.inputs.histories(rows)
        batches = self.inputs.scoring_batches(
            rows["user_id"].to_numpy(),
            rows["item_id"].to_numpy(),
            rows["timestamp"].to_numpy(),
            hist,
            self.cfg.score.batch_size,
        )
        labels, probs = [], []
        for index, batch in batches:
            # model.llm is engine.module
            scores = self.model.answer_scores(**to_device(batch, self.device), answer_ids=self.answer_ids)
            probs.append(p_yes(scores).cpu().numpy())
            labels.append(rows["label"].to_numpy()[index])
        return {"labels": np.concatenate(labels), "probs": np.concatenate(probs)}

    def metrics(self, scored: dict[str, np.ndarray], dtype: str) -> dict:
        from reclora_ray.metrics import binary_metrics

        valid = binary_metrics(scored["labels"], scored["probs"])
        return {"val_auc": valid["auc"], "val_logloss": valid["logloss"], "dtype": dtype}

    def curve(self, metrics: dict) -> dict:
        return {"auc": metrics["val_auc"], "logloss": metrics["val_logloss"], "train_loss": metrics["train_loss"]}

    def summary(self, metrics: dict) -> str:
        return (
            f"epoch {metrics['epoch']}: train loss {metrics['train_loss']:.4f}, valid AUC {metrics['val_auc']:.4f}, "
            f"logloss {metrics['val_logloss']:.4f} ({metrics['dtype']})"
        )


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: a DeepSpeed engine over this worker's share of the few-shot set, for
    the task `loop_config["task"]` (CTRTask unless given; next_item_tune.NextItemTask)."""
    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from reclora_ray.base_model import dtype_name, resolve_dtype, use_cpu_eager_attention
    from reclora_ray.console import setup_worker_logging
    from reclora_ray.llm.model import build_model, causal_lm
    from reclora_ray.llm.plora import unwrap

    setup_worker_logging()  # also where Ray's setup hook did not run (a job's cluster): our lines are shown
    cfg: Config = loop_config["cfg"]
    variant = get_variant(loop_config["variant"])
    run: RunDir = loop_config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)
    train, valid = ray.get(loop_config["train"]), ray.get(loop_config["valid"])

    data = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
    model, tokenizer, crm_spec = build_model(cfg, run, variant, device=device)
    use_cpu_eager_attention(causal_lm(model.llm), device)
    if cfg.tune.gradient_checkpointing:
        unwrap(model.llm).activation_checkpointing_enable()
    task = loop_config.get("task", CTRTask)(cfg, data, variant, model, tokenizer, crm_spec, device)
    base_dtype = dtype_name(resolve_dtype(cfg.llm.dtype, device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The engine owns the LLM only: the frozen CRM stays outside, in its own precision, and
    # out of the optimizer and the checkpoints.
    engine, *_ = deepspeed.initialize(
        model=model.llm,
        model_parameters=trainable,
        dist_init_required=False,
        config=deepspeed_config(cfg, world, loop_config["total_steps"], engine_precision(cfg, base_dtype)),
        lr_scheduler=lr_schedule(cfg, loop_config["total_steps"]),
    )

    history, attempt = [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            history = load_state(engine, Path(ckpt_dir), rank, world)["history"]
        attempt = history[-1]["attempt"] + 1
        log.info("rank %d resumed from the checkpoint of epoch %d", rank, history[-1]["epoch"])
    mb = cfg.tune.micro_batch
    valid = valid.iloc[rank::world]
    curves = Curves(loop_config["curves"], rank, attempt)

    for epoch in range(len(history), cfg.tune.epochs):
        order = epoch_rows(len(train), cfg.run.seed, epoch, rank, world, mb)
        progress = Progress(log, f"{variant.name} epoch {epoch}", len(order) // mb, "micro-batches", active=rank == 0)
        losses = train_epoch(engine, task, train, order, mb, curves, progress)

        # Rank 0's share of the validation rows shows the rate; every rank scores its own.
        progress = Progress(
            log, f"{variant.name} epoch {epoch} validation", len(valid), task.valid_unit, active=rank == 0
        )
        gathered = [None] * world
        dist.all_gather_object(gathered, validate(engine, task, valid, progress))
        metrics = {
            "epoch": epoch,
            "attempt": attempt,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            **task.metrics(merge_scored(gathered, task.empty), base_dtype),
        }
        history.append(metrics)
        curves.epoch(epoch, **task.curve(metrics))

        with tempfile.TemporaryDirectory() as tmp:
            save_state(engine, Path(tmp), rank, world, {"history": history})  # safetensors + JSON, no pickle
            save_engine_adapter(engine, Path(tmp) / "adapter", rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if rank == 0:
            log.info("%s", task.summary(metrics))
    curves.close()


def train_epoch(
    engine, task, rows: pd.DataFrame, order: np.ndarray, micro_batch: int, curves: Curves, progress: Progress
) -> list[float]:
    """One epoch of micro-batches of `rows` in `order`; the loss of each."""
    engine.train()
    losses = []
    for start in range(0, len(order), micro_batch):
        loss = task.loss(engine, rows.iloc[order[start : start + micro_batch]])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        lr = engine.get_lr()[0]
        curves.step(loss=losses[-1], lr=lr)
        progress.update(loss=float(np.mean(losses[-LOSS_WINDOW:])), lr=lr)
    progress.close(loss=float(np.mean(losses)) if losses else float("nan"))
    return losses


def validate(engine, task, valid: pd.DataFrame, progress: Progress) -> dict[str, np.ndarray]:
    """This rank's validation scores, chunk by chunk (the task's arrays, concatenated)."""
    import torch

    engine.eval()
    parts = []
    with torch.no_grad():
        for begin in range(0, len(valid), task.valid_chunk):
            rows = valid.iloc[begin : begin + task.valid_chunk]
            parts.append(task.score(rows))
            progress.update(len(rows))
    progress.close()
    return merge_scored(parts, task.empty)


def merge_scored(parts: list[dict], empty: dict) -> dict[str, np.ndarray]:
    parts = [p for p in parts if p and len(next(iter(p.values())))]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else dict(empty)


def tune_variant(
    cfg: Config, run: RunDir, variant_name: str, overwrite: bool = False, callbacks: list | None = None
) -> Path:
    """Tune one variant; returns OUT/adapter/<variant> (skipped when already done).

    `callbacks`: extra Ray Train `UserCallback`s (run on the Ray Train controller)."""
    variant = get_variant(variant_name)
    if variant.adapter is None:
        raise ValueError(f"variant {variant.name!r} has nothing to tune")
    stage = StageRun("tune", cfg, run, variant.name)  # its config: the variant's own lr (ilora)
    if stage.up_to_date(overwrite):
        return stage.out
    cfg, run = stage.cfg, stage.run
    train = few_shot_sample(load_samples(run, "train", variant), cfg.tune.few_shot, cfg.run.seed)
    valid = fixed_subsample(load_samples(run, "valid", variant), cfg.tune.valid_subsample, cfg.run.seed)
    return fit_adapter(stage, variant, train, valid, CTRTask, callbacks)


def fit_adapter(stage: StageRun, variant: Variant, train, valid, task=CTRTask, callbacks: list | None = None) -> Path:
    """Tune `variant` on the few-shot rows `train` for one task (CTRTask, next_item_tune.NextItemTask)
    on Ray Train, validating on `valid` every epoch; the best epoch's adapter by the task's
    validation figure (`task.score_key`, never a test figure) -> stage.out, with train_metrics.json."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, run, out, fp = stage.cfg, stage.run, stage.out, stage.fingerprint
    world = cfg.tune.num_workers
    micro_batches = (len(train) // world) // cfg.tune.micro_batch  # per rank and epoch (epoch_rows)
    if micro_batches < cfg.tune.grad_accum:
        raise ValueError(
            f"tune.few_shot={len(train)} {task.valid_unit} give each of {world} worker(s) {micro_batches} "
            f"micro-batches of {cfg.tune.micro_batch}, fewer than tune.grad_accum={cfg.tune.grad_accum}: "
            "not one optimizer step; raise tune.few_shot or lower the batch settings"
        )
    total_steps = micro_batches // cfg.tune.grad_accum * cfg.tune.epochs
    log.info(
        "tuning %s (%s)%s on %d few-shot %s, %d validation %s, %d worker(s), %d optimizer steps",
        variant.name,
        variant.description,
        task.purpose,
        len(train),
        task.valid_unit,
        len(valid),
        task.valid_unit,
        world,
        total_steps,
    )

    init_ray(cfg)
    # Kept until the adapter is written: re-running the same command after a crash resumes here.
    storage = run.train_storage(out)
    trainer = TorchTrainer(
        train_loop_per_worker,
        # The few-shot set is small and fixed: each worker reads it whole from the object store and
        # takes its share of a new permutation every epoch (epoch_rows).
        train_loop_config={
            "cfg": cfg,
            "variant": variant.name,
            "run": run.resolved(),
            "task": task,
            "total_steps": total_steps,
            "train": ray.put(train),
            "valid": ray.put(valid),
            "curves": curves_config(cfg.tracking, storage, run.root, f"{stage.stage.name}-{variant.name}"),
        },
        scaling_config=ScalingConfig(num_workers=world, use_gpu=cfg.tune.use_gpu),
        run_config=RunConfig(
            name=f"tune-{fp}",
            storage_path=str(storage),
            callbacks=callbacks or [],
            failure_config=FailureConfig(max_failures=cfg.tune.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=task.score_key, checkpoint_score_order="max"
            ),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt_dir:
        history = read_state(Path(ckpt_dir))["history"]
    kept = {m["epoch"]: c for c, m in result.best_checkpoints}  # Ray's num_to_keep best
    best = best_epoch([h for h in history if h["epoch"] in kept], task.score_key)
    best_checkpoint = kept[best["epoch"]]
    with best_checkpoint.as_directory() as ckpt_dir, stage.write({"variant": variant.name}) as tmp:
        shutil.copytree(Path(ckpt_dir) / "adapter", tmp, dirs_exist_ok=True)
        write_json_atomic(
            tmp / "train_metrics.json",
            {
                "best_epoch": best["epoch"],
                f"best_{task.score_key}": best[task.score_key],
                "few_shot": len(train),
                "valid": len(valid),
                "dtype": best["dtype"],
                "history": history,
            },
        )
        keep_curves(storage, tmp)
    shutil.rmtree(storage, ignore_errors=True)
    log.info(
        "%s%s: best epoch %d (%s %.4f) -> %s",
        variant.name,
        task.purpose,
        best["epoch"],
        task.score_key,
        best[task.score_key],
        out,
    )
    return out


def best_epoch(history: list[dict], key: str = "val_auc") -> dict:
    """The epoch kept: the highest validation figure `key` (never a test figure), the latest of
    tied ones (as Ray Train keeps the latest checkpoints of a tie); an epoch without one (an AUC
    of a validation sample with one class) loses to any with one."""
    if not history:
        raise ValueError("no epoch was validated")
    return max(history, key=lambda h: (-math.inf if math.isnan(h[key]) else h[key], h["epoch"]))


def few_shot_sample(train: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """The paper's few-shot set: n training samples drawn uniformly without replacement, fixed
    by the seed (the whole split when n exceeds it)."""
    return fixed_subsample(train, n, seed)


def run_stage(cfg: Config, run: RunDir, key: str, overwrite: bool = False) -> Path:
    """The `tune` stage of the stage table: OUT/adapter/<variant>."""
    return tune_variant(cfg, run, key, overwrite)

"""Pretrain a CRM on the full training split with Ray Train (Few2Many stage 1).

DDP over `crm.num_workers` workers (CPU or GPU from the config); each worker streams its shard
of the train and valid splits from Ray Data. AdamW + BCE, validation AUC every epoch, early
stopping on it, a Ray Train checkpoint (model + optimizer + epoch + early-stopping state) every
epoch, and a restart from the latest one when a worker dies (`crm.max_failures`). The best
epoch's model is then scored on the test split in this process and written to
OUT/crm/<model>/ (model.safetensors, crm.json, metrics.json, config.yaml).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from reclora_ray.config import Config, CRMConfig
from reclora_ray.console import Progress
from reclora_ray.crm.checkpoint import CRMCheckpointError, save_crm
from reclora_ray.crm.dataset import ray_dataset, retrieval_path
from reclora_ray.crm.features import FeatureSpec, build_features
from reclora_ray.crm.models import build_model
from reclora_ray.crm.predict import predict_split
from reclora_ray.curves import Curves, curves_config, keep_curves
from reclora_ray.data.prepared import SPLITS, PreparedData, PreparedDataError
from reclora_ray.gpu import check_device
from reclora_ray.metrics import binary_metrics
from reclora_ray.rundir import RunDir, write_json_atomic
from reclora_ray.runtime import init_ray
from reclora_ray.stages import StageRun

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
# Rows are shuffled by randomizing the order of chunks (crm.chunk_rows) each epoch and, inside a
# worker, through a buffer this many batches deep.
SHUFFLE_BUFFER_BATCHES = 16


def run_stage(cfg: Config, run: RunDir, key: str | None = None, overwrite: bool = False) -> Path:
    """The `pretrain-crm` stage: OUT/crm/<key> (the instance's config is the table's config_for)."""
    return pretrain_crm(cfg, run, overwrite, key=key)


def pretrain_crm(
    cfg: Config,
    out: str | Path | RunDir,
    overwrite: bool = False,
    callbacks: list | None = None,
    key: str | None = None,
) -> Path:
    """Train cfg.crm.model on OUT/data and write OUT/crm/<model>/; a no-op when already done.

    `key`: the checkpoint name (`sim`, `sasrec-recent`), whose model and history win over cfg.crm's.
    `callbacks`: extra Ray Train `UserCallback`s (run on the Ray Train controller).
    """
    stage = StageRun("pretrain-crm", cfg, out, key or cfg.crm.output_name)
    cfg, run, out_dir = stage.cfg, stage.run, stage.out
    if stage.up_to_date(overwrite):
        return out_dir
    prepared = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
    if cfg.crm.history == "long":
        for split in SPLITS:
            if not retrieval_path(run, split).is_file():
                raise PreparedDataError(
                    f"{retrieval_path(run, split)} is missing: crm.history is 'long', which needs "
                    f"the retrieved histories; run `reclora retrieve --out {run.root}` first (or set crm.history=recent)"
                )
    spec, tables = build_features(prepared, cfg.crm, cfg.retrieve.k_long)
    model = build_model(spec, cfg.crm, tables)  # fails early on a bad model config
    log.info(
        "CRM %s: %d parameters, d_c = %d, history %s (K = %d), %s fields",
        cfg.crm.model,
        sum(p.numel() for p in model.parameters()),
        model.d_c,
        spec.history,
        spec.history_len,
        {**spec.user_fields, **spec.item_fields, **{k: v[0] for k, v in spec.item_bags.items()}},
    )

    storage = run.train_storage(out_dir)
    try:
        result = fit(cfg, prepared, spec, tables, storage, callbacks or [])
        best = best_train_state(result)
        model.load_state_dict(best["model"])
        history = train_state(result.checkpoint)["state"]["history"]  # the last epoch's: every epoch run
        best_epoch = best["state"]["best_epoch"]
        log.info("best epoch %d (valid AUC %.4f); scoring the test split", best_epoch, best["state"]["best_auc"])
        labels, probs = predict_split(model, prepared, "test", chunk_rows=cfg.crm.chunk_rows)
        test = binary_metrics(labels, probs)
        auc, loss = test["auc"], test["logloss"]
        metrics = {
            "model": cfg.crm.model,
            "auc": auc,
            "logloss": loss,
            "n_test": int(len(labels)),
            "d_c": model.d_c,
            "best_epoch": best_epoch,
            "valid_auc": best["state"]["best_auc"],
            # From the last report: the best checkpoint may predate later epochs and restarts.
            "epochs_run": result.metrics["epoch"] + 1,
            "restarts": result.metrics["attempt"],
            "history": history,
        }
        with stage.write({"model": cfg.crm.model}) as tmp:
            save_crm(model, tmp)
            write_json_atomic(tmp / "metrics.json", metrics)
            keep_curves(storage, tmp)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    log.info("CRM %s: test AUC %.4f, LogLoss %.4f on %d samples -> %s", cfg.crm.model, auc, loss, len(labels), out_dir)
    return out_dir


def fit(cfg: Config, prepared: PreparedData, spec: FeatureSpec, tables: dict, storage: Path, callbacks: list):
    """Run the Ray Train job; returns its Result."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(cfg)
    crm = cfg.crm
    sequences_ref = ray.put(prepared.sequences)
    datasets = {
        "train": ray_dataset(prepared, "train", spec, crm.chunk_rows, sequences_ref, shuffle_chunks=True),
        "valid": ray_dataset(prepared, "valid", spec, crm.chunk_rows, sequences_ref, shuffle_chunks=False),
    }
    resources = {"CPU": crm.cpus_per_worker, **({"GPU": 1} if crm.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "crm": crm,
            "spec": spec,
            "tables": tables,
            "seed": cfg.run.seed,
            "train_rows": pq.ParquetFile(prepared.split_path("train")).metadata.num_rows,
            "curves": curves_config(cfg.tracking, storage, storage.parents[1], f"crm-{crm.model}"),
        },
        scaling_config=ScalingConfig(num_workers=crm.num_workers, use_gpu=crm.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"crm-{crm.model}",
            storage_path=str(storage.resolve()),
            failure_config=FailureConfig(max_failures=crm.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="valid_auc", checkpoint_score_order="max"
            ),
            callbacks=callbacks,
        ),
        datasets=datasets,
    )
    log.info(
        "training %s on %d %s worker(s); Ray Train storage %s",
        crm.model,
        crm.num_workers,
        "GPU" if crm.use_gpu else "CPU",
        storage,
    )
    return trainer.fit()


def best_train_state(result) -> dict:
    """The saved train state of the best-validation checkpoint of a finished run."""
    scored = [(metrics.get("valid_auc", -math.inf), checkpoint) for checkpoint, metrics in result.best_checkpoints]
    if not scored:
        raise RuntimeError("Ray Train finished without a checkpoint")
    _, checkpoint = max(scored, key=lambda pair: (not math.isnan(pair[0]), pair[0]))
    return train_state(checkpoint)


def train_state(checkpoint) -> dict:
    with checkpoint.as_directory() as directory:
        return load_train_state(Path(directory) / TRAIN_STATE)


def load_train_state(path: Path) -> dict:
    """A saved train state: tensors, numbers, strings, lists and dicts only. The checkpoint
    folder lives in the run directory across runs, so a pickle there could be anyone's code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CRMCheckpointError(f"{path}: refused, not a plain train state ({str(exc).splitlines()[0]})") from None


# --------------------------------------------------------------------------- on each worker


@dataclass
class EarlyStopping:
    """Everything besides model and optimizer that a restart must restore."""

    epoch: int = 0  # the next epoch to run
    best_auc: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    attempt: int = 0  # how many times the run was restored from a checkpoint
    history: list = field(default_factory=list)

    def update(self, epoch: int, auc: float) -> bool:
        """Record a validation AUC; True when it is the best so far."""
        self.epoch = epoch + 1
        if auc > self.best_auc:
            self.best_auc, self.best_epoch, self.bad_epochs = auc, epoch, 0
            return True
        self.bad_epochs += 1
        return False


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from reclora_ray.console import setup_worker_logging

    setup_worker_logging()  # also where Ray's setup hook did not run (a job's cluster): our lines are shown

    crm: CRMConfig = config["crm"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"])
    if not crm.use_gpu:
        torch.set_num_threads(max(1, int(crm.cpus_per_worker)))
    device = ray.train.torch.get_device()
    check_device(device)

    model = build_model(config["spec"], crm, config["tables"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=crm.lr, weight_decay=crm.weight_decay)
    state = EarlyStopping()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            saved = load_train_state(Path(directory) / TRAIN_STATE)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = EarlyStopping(**saved["state"])
        state.attempt += 1
        if rank == 0:
            log.warning("restored from checkpoint: resuming at epoch %d (restart %d)", state.epoch, state.attempt)
    model = ray.train.torch.prepare_model(model)  # DDP across workers, moved to the device
    plain = model.module if hasattr(model, "module") else model

    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    curves = Curves(config["curves"], rank, state.attempt)
    for epoch in range(state.epoch, crm.epochs):
        started = time.perf_counter()
        steps = math.ceil(config["train_rows"] / world / crm.batch_size)
        progress = Progress(log, f"epoch {epoch}", min(steps, crm.steps_per_epoch or steps), active=rank == 0)
        loss_sum, rows, steady_rows, steady_seconds = train_epoch(
            model, optimizer, train_shard, crm, device, curves, progress
        )
        train_seconds = time.perf_counter() - started
        loss_sum, rows, steady_rows = all_reduce_sum([loss_sum, rows, steady_rows], world)
        labels, probs = predict_shard(model, valid_shard, crm.batch_size, device, world)
        valid = binary_metrics(labels, probs)
        auc, loss = valid["auc"], valid["logloss"]
        improved = state.update(epoch, auc)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / max(rows, 1),
            "valid_auc": auc,
            "valid_logloss": loss,
            "train_samples_per_s": steady_rows / max(steady_seconds, 1e-9),
            "train_seconds": train_seconds,
            "attempt": state.attempt,
        }
        state.history.append(record)
        curves.epoch(epoch, auc=auc, logloss=loss, train_loss=record["train_loss"])
        if rank == 0:
            log.info(
                "epoch %d: train loss %.4f, valid AUC %.4f%s, %.0f samples/s",
                epoch,
                record["train_loss"],
                auc,
                " (best)" if improved else "",
                record["train_samples_per_s"],
            )
        with tempfile.TemporaryDirectory() as directory:
            saved_checkpoint = None
            if rank == 0:
                torch.save(
                    {
                        "model": plain.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "state": dataclasses.asdict(state),
                    },
                    Path(directory) / TRAIN_STATE,
                )
                saved_checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(record, checkpoint=saved_checkpoint)
        if state.bad_epochs >= crm.patience:
            if rank == 0:
                log.info("early stop: no validation AUC gain for %d epochs", state.bad_epochs)
            break
    curves.close()


def train_epoch(model, optimizer, shard, crm: CRMConfig, device, curves: Curves, progress: Progress):
    """One pass (or crm.steps_per_epoch steps) over this worker's shard. Returns the loss sum and
    rows, and the rows and seconds after the first batch (the steady rate, without the warm-up
    of the data pipeline)."""
    model.train()
    loss_sum, rows, first_rows, first_at = 0.0, 0, 0, None
    batches = shard.iter_torch_batches(
        batch_size=crm.batch_size, device=device, local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * crm.batch_size
    )
    for step, batch in enumerate(batches):
        if crm.steps_per_epoch is not None and step >= crm.steps_per_epoch:
            break
        if first_at is None:
            first_at, first_rows = time.perf_counter(), len(batch["label"])
        loss = F.binary_cross_entropy_with_logits(model(batch), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n, value = len(batch["label"]), loss.item()
        loss_sum += value * n
        curves.step(loss=value, lr=optimizer.param_groups[0]["lr"])
        rows += n
        progress.update(loss=value)
    progress.close(loss=loss_sum / max(rows, 1))
    steady_seconds = time.perf_counter() - first_at if first_at is not None else 0.0
    return loss_sum, rows, rows - first_rows, steady_seconds


@torch.no_grad()
def predict_shard(model, shard, batch_size: int, device, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of the whole split: this worker's shard, gathered from all."""
    model.eval()
    labels, probs = [], []
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
        probs.append(torch.sigmoid(model(batch)).cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
    local = (np.concatenate(labels) if labels else np.empty(0), np.concatenate(probs) if probs else np.empty(0))
    if world == 1:
        return local
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, local)
    return np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])


def all_reduce_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()

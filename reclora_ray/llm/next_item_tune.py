"""Tuning on the next-item task: the answer is the target's title, the loss on its tokens only.

The same Ray Train + DeepSpeed loop as `reclora tune` (reclora_ray/llm/tune.py's
train_loop_per_worker, with NextItemTask for what differs: its DeepSpeed config, shuffle,
checkpoints without pickle, resume and progress lines, and its few-shot sample):
each worker runs an engine over the trainable gate and LoRA parameters; every epoch is validated
(HR@1 over the 20 candidates, by candidate likelihood) and checkpointed, a killed worker resumes
from the last checkpoint. The few-shot set is drawn from OUT/data/next_item/train.parquet; the
adapter (and its curves.jsonl) lands in OUT/next-item/adapter/<variant>/.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from reclora_ray.config import Config
from reclora_ray.curves import curves_config, keep_curves
from reclora_ray.llm.histories import fixed_subsample
from reclora_ray.llm.next_item_score import load_rows
from reclora_ray.llm.tune import few_shot_sample, train_loop_per_worker
from reclora_ray.llm.tune_state import read_state
from reclora_ray.rundir import RunDir, write_json_atomic
from reclora_ray.runtime import init_ray
from reclora_ray.stages import StageRun
from reclora_ray.variants import get_variant

log = logging.getLogger(__name__)

SCORE_KEY = "val_hr1"


class NextItemTask:
    """The next-item task of the tuning loop (tune.train_loop_per_worker; see tune.CTRTask): the
    loss on the target title's tokens, validated by HR@1 over the 20 candidates."""

    valid_unit = "sequences"
    empty = {"ranks": np.zeros(0, dtype=np.int64)}

    def __init__(self, cfg: Config, data, variant, model, tokenizer, crm_spec, device):
        from reclora_ray.llm.next_item_score import model_inputs

        self.cfg, self.model, self.device = cfg, model, device
        self.inputs, self.features = model_inputs(cfg, data, tokenizer, variant, crm_spec)
        self.valid_chunk = cfg.score.batch_size * 4

    def loss(self, engine, rows):
        from reclora_ray.llm.inputs import to_device

        users, pos = rows["user_id"].to_numpy(), rows["pos"].to_numpy()
        cands = np.stack(rows["candidates"].to_numpy())
        batch = to_device(self.inputs.training_batch(users, pos, cands, rows["target_index"].to_numpy()), self.device)
        crm_repr = None
        if self.features is not None:
            feats = self.features.without_target(users, pos, rows["timestamp"].to_numpy())
            crm_repr = self.model.crm_repr(to_device(feats, self.device))
        return engine(**batch, crm_repr=crm_repr).loss

    def score(self, rows) -> dict[str, np.ndarray]:
        from reclora_ray.llm.next_item_score import candidate_scores
        from reclora_ray.ranking import target_ranks

        scores = candidate_scores(self.model, self.inputs, self.features, rows, self.cfg.score.batch_size, self.device)
        return {"ranks": target_ranks(scores, rows["target_index"].to_numpy())}

    def metrics(self, scored: dict[str, np.ndarray], dtype: str) -> dict:
        from reclora_ray.ranking import per_row_metrics

        valid = per_row_metrics(scored["ranks"])
        return {SCORE_KEY: float(valid["hr@1"].mean()), "val_ndcg10": float(valid["ndcg@10"].mean())}

    def curve(self, metrics: dict) -> dict:
        return {"hr1": metrics[SCORE_KEY], "ndcg10": metrics["val_ndcg10"], "train_loss": metrics["train_loss"]}

    def summary(self, metrics: dict) -> str:
        return (
            f"next-item epoch {metrics['epoch']}: train loss {metrics['train_loss']:.4f}, "
            f"valid HR@1 {metrics[SCORE_KEY]:.4f}, NDCG@10 {metrics['val_ndcg10']:.4f}"
        )


def tune_next_item(cfg: Config, run: RunDir, variant_name: str, overwrite: bool = False) -> Path:
    """Tune one variant on the next-item task -> OUT/next-item/adapter/<variant> (skipped when done)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    variant = get_variant(variant_name)
    if variant.adapter is None:
        raise ValueError(f"variant {variant.name!r} has nothing to tune")
    stage = StageRun("tune-next-item", cfg, run, variant.name)
    cfg, run, out, fp = stage.cfg, stage.run, stage.out, stage.fingerprint
    if stage.up_to_date(overwrite):
        return out
    train = few_shot_sample(load_rows(run, "train"), cfg.tune.few_shot, cfg.run.seed)
    valid = fixed_subsample(load_rows(run, "valid"), cfg.tune.valid_subsample, cfg.run.seed)
    world = cfg.tune.num_workers
    total_steps = max(1, (len(train) // world) // cfg.tune.micro_batch // cfg.tune.grad_accum) * cfg.tune.epochs
    log.info(
        "tuning %s on the next-item task: %d few-shot sequences, %d validation sequences, %d optimizer steps",
        variant.name,
        len(train),
        len(valid),
        total_steps,
    )

    init_ray(cfg)
    storage = run.train_storage(out)
    trainer = TorchTrainer(
        train_loop_per_worker,
        # As tune.py: each worker takes its share of a new permutation of the fixed set every epoch.
        train_loop_config={
            "cfg": cfg,
            "variant": variant.name,
            "run": run.resolved(),
            "task": NextItemTask,
            "total_steps": total_steps,
            "train": ray.put(train),
            "valid": ray.put(valid),
            "curves": curves_config(cfg.tracking, storage, run.root, f"tune-next-item-{variant.name}"),
        },
        scaling_config=ScalingConfig(num_workers=world, use_gpu=cfg.tune.use_gpu),
        run_config=RunConfig(
            name=f"tune-{fp}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.tune.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=SCORE_KEY, checkpoint_score_order="max"
            ),
        ),
    )
    result = trainer.fit()
    best_checkpoint, best = max(result.best_checkpoints, key=lambda cm: cm[1][SCORE_KEY])
    with best_checkpoint.as_directory() as ckpt_dir, stage.write({"variant": variant.name}) as tmp:
        shutil.copytree(Path(ckpt_dir) / "adapter", tmp, dirs_exist_ok=True)
        history = read_state(Path(ckpt_dir))["history"]
        summary = {
            "best_epoch": best["epoch"],
            f"best_{SCORE_KEY}": best[SCORE_KEY],
            "few_shot": len(train),
            "history": history,
        }
        write_json_atomic(tmp / "train_metrics.json", summary)
        keep_curves(storage, tmp)
    shutil.rmtree(storage, ignore_errors=True)
    log.info("next-item %s: best epoch %d (valid HR@1 %.4f) -> %s", variant.name, best["epoch"], best[SCORE_KEY], out)
    return out


def run_stage(cfg: Config, run: RunDir, key: str, overwrite: bool = False) -> Path:
    """The `tune-next-item` stage: OUT/next-item/adapter/<variant>."""
    return tune_next_item(cfg, run, key, overwrite)

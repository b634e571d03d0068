"""Tuning on the next-item task: the answer is the target's title, the loss on its tokens only.

The same stage as `reclora tune` (tune.fit_adapter and its Ray Train + DeepSpeed loop, with
NextItemTask for what differs): each worker runs an engine over the trainable gate and LoRA
parameters; every epoch is validated (HR@1 over the 20 candidates, by candidate likelihood) and
checkpointed, a killed worker resumes from the last checkpoint, and the epoch with the best
validation HR@1 is kept. The few-shot set is drawn from OUT/data/next_item/train.parquet; the
adapter (with train_metrics.json and curves.jsonl) lands in OUT/next-item/adapter/<variant>/.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from reclora_ray.config import Config
from reclora_ray.llm.histories import fixed_subsample
from reclora_ray.llm.next_item_score import load_rows
from reclora_ray.llm.tune import few_shot_sample, fit_adapter
from reclora_ray.rundir import RunDir
from reclora_ray.stages import StageRun
from reclora_ray.variants import get_variant

log = logging.getLogger(__name__)


class NextItemTask:
    """The next-item task of the tuning loop (tune.train_loop_per_worker; see tune.CTRTask): the
    loss on the target title's tokens, validated by HR@1 over the 20 candidates."""

    valid_unit = "sequences"
    score_key = "val_hr1"  # the validation figure that picks the epoch kept
    purpose = " for next-item ranking"
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
        return {"val_hr1": float(valid["hr@1"].mean()), "val_ndcg10": float(valid["ndcg@10"].mean()), "dtype": dtype}

    def curve(self, metrics: dict) -> dict:
        return {"hr1": metrics["val_hr1"], "ndcg10": metrics["val_ndcg10"], "train_loss": metrics["train_loss"]}

    def summary(self, metrics: dict) -> str:
        return (
            f"next-item epoch {metrics['epoch']}: train loss {metrics['train_loss']:.4f}, "
            f"valid HR@1 {metrics['val_hr1']:.4f}, NDCG@10 {metrics['val_ndcg10']:.4f}"
        )


def tune_next_item(cfg: Config, run: RunDir, variant_name: str, overwrite: bool = False) -> Path:
    """Tune one variant on the next-item task -> OUT/next-item/adapter/<variant> (skipped when done)."""
    variant = get_variant(variant_name)
    if variant.adapter is None:
        raise ValueError(f"variant {variant.name!r} has nothing to tune")
    stage = StageRun("tune-next-item", cfg, run, variant.name)
    if stage.up_to_date(overwrite):
        return stage.out
    cfg, run = stage.cfg, stage.run
    train = few_shot_sample(load_rows(run, "train"), cfg.tune.few_shot, cfg.run.seed)
    valid = fixed_subsample(load_rows(run, "valid"), cfg.tune.valid_subsample, cfg.run.seed)
    return fit_adapter(stage, variant, train, valid, NextItemTask)


def run_stage(cfg: Config, run: RunDir, key: str, overwrite: bool = False) -> Path:
    """The `tune-next-item` stage: OUT/next-item/adapter/<variant>."""
    return tune_next_item(cfg, run, key, overwrite)

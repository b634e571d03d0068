"""Next-item scoring with Ray Data: every model ranks the same 20 candidates of each test sequence.

LLM variants score a candidate by the length-normalised log-likelihood of its title after the
iLoRA prompt (`candidate_logliks`, one prefix pass per prompt); the CRM alone by its logit for
(user, recent history, candidate). Both read the recent history: the next item is unknown when
the prompt is written, so there is no target to retrieve by, and a gate's R_c is computed with
no target item (the unknown-item code). Output: OUT/next-item/scores/<name>/predictions.parquet
(sample_id, user_id, target_index, scores) and metrics.json (HR@k, NDCG@k, MRR, n).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from reclora_ray.config import Config
from reclora_ray.data.prepared import PreparedData
from reclora_ray.llm.collate import PromptCollator, length_buckets
from reclora_ray.llm.next_item import NextItemInputs, candidate_logliks
from reclora_ray.llm.prompt import PromptBuilder
from reclora_ray.ranking import ranking_metrics
from reclora_ray.rundir import RunDir, write_json_atomic
from reclora_ray.runtime import init_ray
from reclora_ray.stages import StageRun
from reclora_ray.variants import Variant, crm_name, get_variant

log = logging.getLogger(__name__)

def load_rows(run: RunDir, split: str) -> pd.DataFrame:
    """A split's next-item rows with `candidates` as one list column (for Ray Data blocks)."""
    rows, candidates = PreparedData.load(run.data).next_item(split)
    return rows.assign(candidates=list(candidates))


class NextItemFeatures:
    """The CRM's inputs for next-item rows: the recent k_long behaviours, and per candidate."""

    def __init__(self, data: PreparedData, crm_spec, k_long: int):
        from reclora_ray.crm.features import FeatureEncoder

        self.sequences = data.sequences
        self.encoder = FeatureEncoder(crm_spec)
        self.k_long = k_long

    def _history(self, users, pos):
        idx = self.sequences.recent(users, pos, self.k_long)
        return self.sequences.gather(users, idx, "item_ids"), self.sequences.gather(users, idx, "ratings")

    def encode(self, users, pos, timestamps, items) -> dict[str, torch.Tensor]:
        users = np.asarray(users, dtype=np.int64)
        hist_items, hist_ratings = self._history(users, pos)
        batch = self.encoder.encode(users, items, timestamps, hist_items, hist_ratings)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}

    def without_target(self, users, pos, timestamps) -> dict[str, torch.Tensor]:
        """For the gate's R_c: the item slot holds the unknown-item code."""
        return self.encode(users, pos, timestamps, np.full(len(users), -1, dtype=np.int64))

    def per_candidate(self, users, pos, timestamps, candidates: np.ndarray) -> dict[str, torch.Tensor]:
        n_cand = candidates.shape[1]
        rep = lambda a: np.repeat(np.asarray(a), n_cand)  # noqa: E731
        return self.encode(rep(users), rep(pos), rep(timestamps), candidates.reshape(-1))


def _as_candidates(rows: pd.DataFrame) -> np.ndarray:
    return np.stack(rows["candidates"].to_numpy()).astype(np.int64)


def model_inputs(cfg: Config, data: PreparedData, tokenizer, variant: Variant,
                 crm_spec) -> tuple[NextItemInputs, NextItemFeatures | None]:
    """The prompt side and, for a gated variant, the CRM side of next-item rows."""
    inputs = NextItemInputs(PromptBuilder.from_prepared(data, tokenizer, cfg.llm.chat_template),
                            PromptCollator(tokenizer, cfg.llm.max_length), data.sequences, cfg.data.next_item.history)
    return inputs, (NextItemFeatures(data, crm_spec, cfg.retrieve.k_long) if variant.uses_crm else None)


def candidate_scores(model, inputs: NextItemInputs, features: NextItemFeatures | None, rows: pd.DataFrame,
                     batch_size: int, device) -> np.ndarray:
    """(n, C) candidate log-likelihoods of a RecLoRAModel for next-item rows, length-bucketed."""
    users, pos, cands = rows["user_id"].to_numpy(), rows["pos"].to_numpy(), _as_candidates(rows)
    prompts = inputs.prompt_ids(users, pos, cands)
    cand_ids = inputs.candidate_ids(cands)
    crm_repr = None
    if features is not None:
        feats = features.without_target(users, pos, rows["timestamp"].to_numpy())
        crm_repr = model.crm_repr({k: v.to(device) for k, v in feats.items()})
    out = np.zeros(cands.shape, dtype=np.float32)
    # Each prompt carries C continuations, each with vocabulary logits at every title token: a
    # pass holds about 2 x batch_size continuation rows, not batch_size x C.
    per_pass = max(1, 2 * batch_size // cands.shape[1])
    for index in length_buckets([len(p) for p in prompts], per_pass):
        out[index] = candidate_logliks(model.llm, inputs.collator, [prompts[i] for i in index],
                                       [cand_ids[i] for i in index],
                                       None if crm_repr is None else crm_repr[index]).float().cpu().numpy()
    return out


class NextItemScorer:
    """Ray Data actor: an LLM variant's candidate log-likelihoods for next-item rows."""

    def __init__(self, cfg: Config, run: RunDir, variant_name: str, adapter: Path | None):
        from reclora_ray.llm.model import build_model
        from reclora_ray.llm.score import scoring_device

        self.variant = get_variant(variant_name)
        self.device = scoring_device(cfg.score.num_gpus)
        data = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
        self.model, tokenizer, spec = build_model(cfg, run, self.variant, adapter,
                                                  device=self.device)
        self.model.eval()
        self.inputs, self.features = model_inputs(cfg, data, tokenizer, self.variant, spec)
        self.batch_size = cfg.score.batch_size

    def scores(self, rows: pd.DataFrame) -> np.ndarray:
        return candidate_scores(self.model, self.inputs, self.features, rows, self.batch_size, self.device)

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        rows = rows.reset_index(drop=True)
        return rows[["sample_id", "user_id", "target_index"]].assign(scores=list(self.scores(rows)))


class NextItemCRMScorer:
    """Ray Data actor: a CRM alone, its logit for each (user, history, candidate)."""

    def __init__(self, cfg: Config, run: RunDir, crm_dir: Path):
        from reclora_ray.crm import load_crm

        data = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
        self.model = load_crm(crm_dir)
        self.features = NextItemFeatures(data, self.model.spec, cfg.retrieve.k_long)

    @torch.inference_mode()
    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        rows = rows.reset_index(drop=True)
        cands = _as_candidates(rows)
        feats = self.features.per_candidate(rows["user_id"].to_numpy(), rows["pos"].to_numpy(),
                                            rows["timestamp"].to_numpy(), cands)
        logits = self.model(feats).float().numpy().reshape(cands.shape)
        return rows[["sample_id", "user_id", "target_index"]].assign(scores=list(logits))


def _score_with(actor, ctor_kwargs: dict, rows: pd.DataFrame, cfg: Config, stage: StageRun,
                num_gpus: float, info: dict) -> dict:
    import ray.data

    init_ray(cfg)
    block_rows = max(cfg.score.batch_size * 4, 32)
    ds = ray.data.from_pandas([rows.iloc[i:i + block_rows] for i in range(0, len(rows), block_rows)])
    scored = ds.map_batches(actor, fn_constructor_kwargs=ctor_kwargs, batch_size=block_rows, batch_format="pandas",
                            compute=ray.data.ActorPoolStrategy(size=cfg.score.concurrency), num_gpus=num_gpus)
    preds = scored.to_pandas().sort_values("sample_id", ignore_index=True)
    metrics = ranking_metrics(np.stack(preds["scores"].to_numpy()), preds["target_index"].to_numpy()) | info
    with stage.write() as tmp:
        preds.to_parquet(tmp / "predictions.parquet", index=False)
        write_json_atomic(tmp / "metrics.json", metrics)
    log.info("%s (next item): HR@1 %.4f, NDCG@10 %.4f on %d test sequences -> %s",
             info["model"], metrics["hr@1"], metrics["ndcg@10"], metrics["n"], stage.out)
    return metrics


def score_next_item(cfg: Config, run: RunDir, name: str, overwrite: bool = False) -> Path:
    """An LLM variant (its next-item adapter, or the base model) on the test sequences."""
    variant: Variant = get_variant(name)
    stage = StageRun("score-next-item", cfg, run, variant.name)
    run = stage.run.resolved()
    if stage.up_to_date(overwrite):
        return stage.out
    rows = load_rows(run, "test")
    log.info("scoring %s on %d next-item test sequences", variant.name, len(rows))
    _score_with(NextItemScorer, {"cfg": cfg, "run": run, "variant_name": variant.name,
                                 "adapter": run.next_item_adapter(variant.name) if variant.adapter else None},
                rows, cfg, stage, cfg.score.num_gpus, {"model": variant.name, "variant": variant.description})
    return stage.out


def score_next_item_crm(cfg: Config, run: RunDir, variant_name: str, overwrite: bool = False) -> Path:
    """The CRM a variant's gate reads, alone, on the same candidates -> OUT/next-item/scores/crm-<name>/."""
    name = crm_name(cfg, get_variant(variant_name))
    stage = StageRun("score-next-item-crm", cfg, run, variant_name)
    run = stage.run.resolved()
    if stage.up_to_date(overwrite):
        return stage.out
    _score_with(NextItemCRMScorer, {"cfg": cfg, "run": run, "crm_dir": run.crm(name)},
                load_rows(run, "test"), cfg, stage, 0, {"model": f"crm-{name}", "variant": f"the CRM {name} alone"})
    return stage.out


def run_stage(cfg: Config, run: RunDir, key: str, overwrite: bool = False) -> Path:
    """The `score-next-item` stage: OUT/next-item/scores/<variant>."""
    return score_next_item(cfg, run, key, overwrite)


def run_crm_stage(cfg: Config, run: RunDir, key: str, overwrite: bool = False) -> Path:
    """The `score-next-item-crm` stage: OUT/next-item/scores/crm-<the CRM of variant `key`>."""
    return score_next_item_crm(cfg, run, key, overwrite)

"""`reclora score`: batch scoring with Ray Data over an actor pool.

Each actor loads the base LLM, the adapter and the CRM once (`Scorer`). A prompt costs one
forward pass: no `generate`, logits at the last position only, P(yes) = softmax(s_yes, s_no)
(paper Eq. 16), prompts grouped by token length so padded batches waste little. The CRM alone
and the zero-shot base model are scored on the same samples, so every row of the report
compares like with like. Output: OUT/scores/<name>/predictions.parquet (sample_id, user_id,
user_raw_id, item_id, item_raw_id (catalogue ids), label, p_yes[, gate]) and metrics.json (AUC, LogLoss, n).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from reclora_ray.config import Config
from reclora_ray.data.catalogue import add_catalogue_ids
from reclora_ray.data.prepared import PreparedData
from reclora_ray.llm.collate import p_yes
from reclora_ray.llm.histories import Histories, fixed_subsample, history_indices, load_samples
from reclora_ray.llm.inputs import InputBuilder, to_device
from reclora_ray.llm.model import causal_lm
from reclora_ray.metrics import binary_metrics
from reclora_ray.rundir import RunDir, write_json_atomic
from reclora_ray.runtime import init_ray
from reclora_ray.stages import StageRun
from reclora_ray.variants import crm_name, get_variant

log = logging.getLogger(__name__)

KEEP = ["sample_id", "user_id", "item_id", "label"]


def scoring_device(num_gpus: float) -> torch.device:
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


class Scorer:
    """Base LLM + adapter + CRM, loaded once; P(yes) and the gate weights for any samples.

    Called on a DataFrame of prepared samples (the Ray Data actor), or through `score` with
    explicit histories (the online service)."""

    def __init__(self, cfg: Config, run: RunDir, variant_name: str, data: PreparedData | None = None):
        from reclora_ray.llm.model import build_model

        run = RunDir.of(run)
        variant = get_variant(variant_name)
        device = scoring_device(cfg.score.num_gpus)
        data = data or PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
        adapter = run.adapter(variant.name) if variant.adapter else None
        model, tokenizer, crm_spec = build_model(cfg, run, variant, adapter, device=device)
        self._attach(model, InputBuilder(cfg, data, variant, tokenizer, crm_spec), data, device, cfg.score.batch_size)

    @classmethod
    def from_model(cls, model, inputs: InputBuilder, data: PreparedData, device: torch.device,
                   batch_size: int) -> "Scorer":
        """A scorer around a model already built (benchmarks, notebooks)."""
        scorer = cls.__new__(cls)
        scorer._attach(model, inputs, data, device, batch_size)
        return scorer

    def _attach(self, model, inputs: InputBuilder, data: PreparedData, device: torch.device, batch_size: int) -> None:
        self.model = model.eval()
        self.inputs = inputs
        self.variant = inputs.variant
        self.data = data
        self.device = device
        self.batch_size = batch_size
        self.dtype = str(causal_lm(model.llm).dtype).removeprefix("torch.")  # the base's, as resolved

    @torch.inference_mode()
    def score(self, user_ids, item_ids, timestamps, hist: Histories) -> tuple[np.ndarray, np.ndarray | None]:
        """(P(yes) (n,), gate weights (n, N_m) or None without a gate)."""
        collator = self.inputs.collator
        probs = np.zeros(len(user_ids), dtype=np.float32)
        gates = None
        for index, batch in self.inputs.scoring_batches(user_ids, item_ids, timestamps, hist, self.batch_size):
            batch = to_device(batch, self.device)
            scores = self.model.answer_scores(**batch, answer_ids=collator.yes_no)
            probs[index] = p_yes(scores).cpu().numpy()
            if self.variant.uses_crm:
                alpha = self.model.gate_weights(batch["crm_features"]).float().cpu().numpy()
                if gates is None:
                    gates = np.zeros((len(user_ids), alpha.shape[-1]), dtype=np.float32)
                gates[index] = alpha
        return probs, gates

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        rows = rows.reset_index(drop=True)
        probs, gates = self.score(rows["user_id"].to_numpy(), rows["item_id"].to_numpy(),
                                  rows["timestamp"].to_numpy(), self.inputs.histories(rows))
        out = rows[KEEP].assign(p_yes=probs, dtype=self.dtype)
        if gates is not None:
            out["gate"] = list(gates)
        return out


class CRMScorer:
    """Ray Data actor: the CRM alone, sigmoid(logit), on the same rows as the LLMs."""

    def __init__(self, cfg: Config, run: RunDir, crm_dir: Path, long_mode: str):
        from reclora_ray.crm import load_crm
        from reclora_ray.crm.features import FeatureEncoder

        self.data = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
        self.model = load_crm(crm_dir)
        self.encoder = FeatureEncoder(self.model.spec)
        self.long_mode = long_mode
        self.k_long = cfg.retrieve.k_long

    @torch.inference_mode()
    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        rows = rows.reset_index(drop=True)
        users, seqs = rows["user_id"].to_numpy(), self.data.sequences
        indices = history_indices(seqs, rows, self.long_mode, self.k_long, "hist_long")
        batch = self.encoder.encode(users, rows["item_id"].to_numpy(), rows["timestamp"].to_numpy(),
                                    seqs.gather(users, indices, "item_ids"), seqs.gather(users, indices, "ratings"))
        logits = self.model({key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in batch.items()})
        return rows[KEEP].assign(p_yes=torch.sigmoid(logits).float().numpy())


def _score_with(actor, ctor_kwargs: dict, rows: pd.DataFrame, cfg: Config, stage: StageRun,
                num_gpus: float, info: dict) -> dict:
    import ray.data

    init_ray(cfg)
    block_rows = max(cfg.score.batch_size * 8, 128)
    ds = ray.data.from_pandas([rows.iloc[i:i + block_rows] for i in range(0, len(rows), block_rows)])
    scored = ds.map_batches(actor, fn_constructor_kwargs=ctor_kwargs, batch_size=block_rows, batch_format="pandas",
                            compute=ray.data.ActorPoolStrategy(size=cfg.score.concurrency), num_gpus=num_gpus)
    preds = scored.to_pandas().sort_values("sample_id", ignore_index=True)
    if "dtype" in preds:  # the LLM's dtype as the actors resolved it, saved with the metrics
        info = info | {"dtype": ", ".join(sorted(preds.pop("dtype").unique()))}
    preds = add_catalogue_ids(preds, stage.run.data)  # raw ids beside the dense ones
    metrics = binary_metrics(preds["label"].to_numpy(), preds["p_yes"].to_numpy()) | info
    with stage.write() as tmp:
        preds.to_parquet(tmp / "predictions.parquet", index=False)
        write_json_atomic(tmp / "metrics.json", metrics)
    log.info("%s: AUC %.4f, LogLoss %.4f on %d test samples -> %s",
             info["model"], metrics["auc"], metrics["logloss"], metrics["n"], stage.out)
    return metrics


def score_variant(cfg: Config, run: RunDir, name: str, overwrite: bool = False) -> Path:
    """P(yes) of one LLM variant on the test split -> OUT/scores/<variant>/ (skipped when done)."""
    variant = get_variant(name)
    stage = StageRun("score", cfg, run, variant.name)
    run = stage.run
    if stage.up_to_date(overwrite):
        return stage.out
    rows = llm_test_rows(cfg, load_samples(run, "test", variant))
    log.info("scoring %s on %d test samples", variant.name, len(rows))
    _score_with(Scorer, {"cfg": cfg, "run": run.resolved(), "variant_name": variant.name},
                rows, cfg, stage, cfg.score.num_gpus, {"model": variant.name, "variant": variant.description})
    return stage.out


def llm_test_rows(cfg: Config, test: pd.DataFrame) -> pd.DataFrame:
    """The test samples every LLM row is scored on: one fixed random subsample of the test split
    (score.llm_subsample, seed run.seed), the same for every variant; the CRM scores them all."""
    return fixed_subsample(test.sort_values("sample_id"), cfg.score.llm_subsample, cfg.run.seed)


def score_crm(cfg: Config, run: RunDir, variant_name: str = "reclora", overwrite: bool = False) -> Path:
    """The CRM a variant's gate reads, alone, on the same test rows -> OUT/scores/crm-<name>/."""
    variant = get_variant(variant_name)
    name = crm_name(cfg, variant)
    stage = StageRun("score-crm", cfg, run, variant.name)
    run = stage.run
    if stage.up_to_date(overwrite):
        return stage.out
    rows = load_samples(run, "test", variant)
    _score_with(CRMScorer, {"cfg": cfg, "run": run.resolved(), "crm_dir": run.resolved().crm(name),
                            "long_mode": variant.long_mode},
                rows, cfg, stage, 0, {"model": f"crm-{name}", "variant": f"the CRM ({cfg.crm.model}) alone"})
    return stage.out


def run_stage(cfg: Config, run: RunDir, key: str, overwrite: bool = False) -> Path:
    """The `score` stage of the stage table: OUT/scores/<variant>."""
    return score_variant(cfg, run, key, overwrite)


def run_crm_stage(cfg: Config, run: RunDir, key: str, overwrite: bool = False) -> Path:
    """The `score-crm` stage: OUT/scores/crm-<the CRM of variant `key`>."""
    return score_crm(cfg, run, key, overwrite)

"""`reclora score`: batch scoring with Ray Data over an actor pool.

Each actor loads the base LLM, the adapter and the CRM once (`Scorer`). A prompt costs one
forward pass: no `generate`, logits at the last position only, P(yes) = softmax(s_yes, s_no)
(paper Eq. 16), prompts grouped by token length so padded batches waste little. The CRM alone
and the zero-shot base model are scored on the same samples, so every row of the report
compares like with like. Rows are read, scored and written by the workers (`scoring.py`): the
driver never holds them. Output: OUT/scores/<name>/predictions/*.parquet, Parquet shards written
by Ray Data (sample_id, user_id, user_raw_id, item_id, item_raw_id (catalogue ids), label, p_yes,
dtype[, gate]; read them with `predictions.read_predictions`, which also reads an older run's single
predictions.parquet) and metrics.json (AUC, LogLoss, n, computed over the shards by the workers).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from reclora_ray.config import Config
from reclora_ray.data.prepared import PreparedData
from reclora_ray.llm.collate import p_yes
from reclora_ray.llm.histories import Histories, fixed_subsample, history_indices_of
from reclora_ray.llm.inputs import InputBuilder, to_device
from reclora_ray.llm.model import causal_lm
from reclora_ray.rundir import RunDir
from reclora_ray.runtime import init_ray
from reclora_ray.scoring import score_with, split_rows, subsample_ids
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

    def __init__(self, cfg: Config, run: RunDir | str, variant_name: str, data: PreparedData | None = None):
        from reclora_ray.llm.model import build_model

        run = RunDir.of(run)
        variant = get_variant(variant_name)
        device = scoring_device(cfg.score.num_gpus)
        data = data or PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
        adapter = run.adapter(variant.name) if variant.adapter else None
        model, tokenizer, crm_spec = build_model(cfg, run, variant, adapter, device=device)
        self._attach(model, InputBuilder(cfg, data, variant, tokenizer, crm_spec), data, device, cfg.score.batch_size)

    @classmethod
    def from_model(
        cls, model, inputs: InputBuilder, data: PreparedData, device: torch.device, batch_size: int
    ) -> "Scorer":
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
        probs, gates = self.score(
            rows["user_id"].to_numpy(),
            rows["item_id"].to_numpy(),
            rows["timestamp"].to_numpy(),
            self.inputs.histories(rows),
        )
        out = rows[KEEP].assign(p_yes=probs, dtype=self.dtype)
        if gates is not None:
            out["gate"] = list(gates)
        return out


class CRMScorer:
    """Ray Data actor: the CRM alone, sigmoid(logit), on the same rows as the LLMs."""

    def __init__(self, cfg: Config, run: RunDir | str, crm_dir: Path, long_mode: str):
        from reclora_ray.crm import load_crm
        from reclora_ray.crm.features import FeatureEncoder

        self.data = PreparedData.load(RunDir.of(run).data, expect_dataset=cfg.data.dataset)
        self.model = load_crm(crm_dir)
        self.encoder = FeatureEncoder(self.model.spec)
        self.long_mode = long_mode
        self.k_long = cfg.retrieve.k_long

    @torch.inference_mode()
    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        rows = rows.reset_index(drop=True)
        users, seqs = rows["user_id"].to_numpy(), self.data.sequences
        indices = history_indices_of(rows, self.long_mode, self.k_long, "hist_long")
        batch = self.encoder.encode(
            users,
            rows["item_id"].to_numpy(),
            rows["timestamp"].to_numpy(),
            seqs.gather(users, indices, "item_ids"),
            seqs.gather(users, indices, "ratings"),
        )
        logits = self.model({key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in batch.items()})
        return rows[KEEP].assign(p_yes=torch.sigmoid(logits).float().numpy())


def ctr_summary(staged: Path) -> dict:
    """AUC, LogLoss and n of written predictions, and the LLM's dtype as the actors resolved it
    (their `dtype` column)."""
    from reclora_ray.predictions import binary_metrics_of, shard_files, unique_strings

    metrics = binary_metrics_of(staged)
    if "dtype" in pq.read_schema(shard_files(staged)[0]).names:
        metrics["dtype"] = ", ".join(unique_strings(staged, "dtype"))
    return metrics


def _score_ctr(actor, ctor_kwargs: dict, rows, stage: StageRun, num_gpus: float, info: dict) -> dict:
    metrics = score_with(
        actor,
        ctor_kwargs,
        rows,
        stage=stage,
        num_gpus=num_gpus,
        max_call_rows=max(stage.cfg.score.batch_size * 8, 128),
        summarize=ctr_summary,
        info=info,
        data_dir=stage.run.data,
    )
    log.info(
        "%s: AUC %.4f, LogLoss %.4f on %d test samples -> %s",
        info["model"],
        metrics["auc"],
        metrics["logloss"],
        metrics["n"],
        stage.out,
    )
    return metrics


def ctr_test_rows(cfg: Config, run: RunDir, variant, subsample: bool):
    """The test split's rows (`SplitRows`: with the retrieved histories the variant reads), cut to
    `llm_test_rows`' fixed subsample when `subsample`."""
    from reclora_ray.retrieval.retrieve import retrieval_dir

    init_ray(cfg)  # ours, before Ray Data builds the dataset (which would start a default Ray)
    samples = run.data / "samples" / "test.parquet"
    retrieval = retrieval_dir(run) / "test.parquet" if variant.needs_retrieval else None
    keep = subsample_ids(samples, cfg.score.llm_subsample, cfg.run.seed) if subsample else None
    return split_rows(samples, retrieval, keep, actors=cfg.score.concurrency)


def score_variant(cfg: Config, run: RunDir, name: str, overwrite: bool = False) -> Path:
    """P(yes) of one LLM variant on the test split -> OUT/scores/<variant>/ (skipped when done)."""
    variant = get_variant(name)
    stage = StageRun("score", cfg, run, variant.name)
    run, out = stage.run, stage.out
    if stage.up_to_date(overwrite):
        return out
    rows = ctr_test_rows(cfg, run, variant, subsample=True)
    log.info(
        "scoring %s on %d test samples (score.llm_subsample %s)", variant.name, rows.n_rows, cfg.score.llm_subsample
    )
    _score_ctr(
        Scorer,
        {"cfg": cfg, "run": run.resolved(), "variant_name": variant.name},
        rows,
        stage,
        cfg.score.num_gpus,
        {"model": variant.name, "variant": variant.description},
    )
    return out


def llm_test_rows(cfg: Config, test: pd.DataFrame) -> pd.DataFrame:
    """The test samples every LLM row is scored on: one fixed random subsample of the test split
    (score.llm_subsample, seed run.seed), the same for every variant; the CRM scores them all."""
    return fixed_subsample(test.sort_values("sample_id"), cfg.score.llm_subsample, cfg.run.seed)


def score_crm(cfg: Config, run: RunDir, variant_name: str = "reclora", overwrite: bool = False) -> Path:
    """The CRM a variant's gate reads, alone, on the same test rows -> OUT/scores/crm-<name>/."""
    variant = get_variant(variant_name)
    name = crm_name(cfg, variant)
    stage = StageRun("score-crm", cfg, run, variant.name)
    run, out = stage.run, stage.out
    if stage.up_to_date(overwrite):
        return out
    _score_ctr(
        CRMScorer,
        {"cfg": cfg, "run": run.resolved(), "crm_dir": run.resolved().crm(name), "long_mode": variant.long_mode},
        ctr_test_rows(cfg, run, variant, subsample=False),
        stage,
        0,
        {"model": f"crm-{name}", "variant": f"the CRM ({cfg.crm.model}) alone"},
    )
    return out


def run_stage(cfg: Config, run: RunDir, key: str, overwrite: bool = False) -> Path:
    """The `score` stage of the stage table: OUT/scores/<variant>."""
    return score_variant(cfg, run, key, overwrite)


def run_crm_stage(cfg: Config, run: RunDir, key: str, overwrite: bool = False) -> Path:
    """The `score-crm` stage: OUT/scores/crm-<the CRM of variant `key`>."""
    return score_crm(cfg, run, key, overwrite)

"""Next-item scoring with Ray Data: every model ranks the same 20 candidates of each test sequence.

LLM variants score a candidate by the length-normalised log-likelihood of its title after the
iLoRA prompt (`candidate_logliks`, one prefix pass per prompt); the CRM alone by its logit for
(user, recent history, candidate). Both read the recent history: the next item is unknown when
the prompt is written, so there is no target to retrieve by, and a gate's R_c is computed with
no target item (the unknown-item code). On a fixed subsample of the sequences
(score.next_item.generate) the LLM rows also answer by greedy generation, matched to a candidate
(`next_item.match_answer`): iLoRA's HR@1 over valid answers and ValidRatio. Rows are read, scored
and written by the workers (`scoring.score_with`, the same helper as CTR scoring). Output:
OUT/next-item/scores/<name>/predictions/*.parquet (sample_id, user_id, target_index, scores[,
generated, matched: the candidate index, -1 invalid, -2 not generated]) and metrics.json (HR@k,
NDCG@k, MRR, n[, gen_n, valid_ratio, gen_hr@1 (over valid answers), gen_hr@1_all]).
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
from reclora_ray.llm.collate import PromptCollator, length_buckets
from reclora_ray.llm.next_item import NextItemInputs, candidate_logliks, greedy_answers, match_answer
from reclora_ray.llm.prompt import PromptBuilder
from reclora_ray.ranking import per_row_metrics, target_ranks
from reclora_ray.rundir import RunDir
from reclora_ray.runtime import init_ray
from reclora_ray.scoring import score_with, split_rows, subsample_ids
from reclora_ray.stages import StageRun
from reclora_ray.variants import Variant, crm_name, get_variant

log = logging.getLogger(__name__)


def split_path(run: RunDir, split: str) -> Path:
    from reclora_ray.data.next_item import NEXT_ITEM_DIR

    return run.data / NEXT_ITEM_DIR / f"{split}.parquet"


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


def model_inputs(
    cfg: Config, data: PreparedData, tokenizer, variant: Variant, crm_spec
) -> tuple[NextItemInputs, NextItemFeatures | None]:
    """The prompt side and, for a gated variant, the CRM side of next-item rows."""
    inputs = NextItemInputs(
        PromptBuilder.from_prepared(data, tokenizer, cfg.llm.chat_template),
        PromptCollator(tokenizer, cfg.llm.max_length),
        data.sequences,
        cfg.data.next_item.history,
    )
    return inputs, (NextItemFeatures(data, crm_spec, cfg.retrieve.k_long) if variant.uses_crm else None)


def candidate_scores(
    model, inputs: NextItemInputs, features: NextItemFeatures | None, rows: pd.DataFrame, batch_size: int, device
) -> np.ndarray:
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
        out[index] = (
            candidate_logliks(
                model.llm,
                inputs.collator,
                [prompts[i] for i in index],
                [cand_ids[i] for i in index],
                None if crm_repr is None else crm_repr[index],
            )
            .float()
            .cpu()
            .numpy()
        )
    return out


NOT_GENERATED, INVALID = -2, -1  # `matched` of a row not generated for, and of an answer naming no candidate


def generate_and_match(
    model,
    inputs: NextItemInputs,
    features: NextItemFeatures | None,
    rows: pd.DataFrame,
    batch_size: int,
    device,
    max_new_tokens: int,
    fuzzy_cutoff: float,
) -> tuple[list[str], np.ndarray]:
    """Greedy answers of a RecLoRAModel to next-item prompts, and the candidate each names (-1: none)."""
    users, pos, cands = rows["user_id"].to_numpy(), rows["pos"].to_numpy(), _as_candidates(rows)
    prompts = inputs.prompt_ids(users, pos, cands)
    crm_repr = None
    if features is not None:
        feats = features.without_target(users, pos, rows["timestamp"].to_numpy())
        crm_repr = model.crm_repr({k: v.to(device) for k, v in feats.items()})
    tokenizer = inputs.collator.tokenizer
    stop = {t for t in (tokenizer.eos_token_id, inputs.collator.pad_id) if t is not None}
    texts = [""] * len(rows)
    for index in length_buckets([len(p) for p in prompts], batch_size):
        answers = greedy_answers(
            model.llm,
            inputs.collator,
            [prompts[i] for i in index],
            max_new_tokens,
            stop,
            None if crm_repr is None else crm_repr[index],
        )
        for i, ids in zip(index, answers):
            texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
    titles = inputs.prompts.titles
    matched = np.array(
        [match_answer(text, titles[row], fuzzy_cutoff) for text, row in zip(texts, cands)], dtype=np.int16
    )
    return texts, matched


class NextItemScorer:
    """Ray Data actor: an LLM variant's candidate log-likelihoods for next-item rows, and its
    generated answers on the rows whose sample id is in `generate_ids`."""

    def __init__(
        self,
        cfg: Config,
        run: RunDir,
        variant_name: str,
        adapter: Path | None,
        generate_ids: np.ndarray | bool | None = None,
    ):
        from reclora_ray.base_model import use_cpu_eager_attention
        from reclora_ray.llm.model import build_model, causal_lm
        from reclora_ray.llm.score import scoring_device

        self.variant = get_variant(variant_name)
        self.device = scoring_device(cfg.score.num_gpus)
        data = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
        self.model, tokenizer, spec = build_model(cfg, run, self.variant, adapter, device=self.device)
        use_cpu_eager_attention(causal_lm(self.model.llm), self.device)
        self.model.eval()
        self.inputs, self.features = model_inputs(cfg, data, tokenizer, self.variant, spec)
        self.batch_size = cfg.score.batch_size
        self.generate_ids = generate_ids if generate_ids is None or generate_ids is True else np.asarray(generate_ids)
        self.generation = cfg.score.next_item

    def scores(self, rows: pd.DataFrame) -> np.ndarray:
        return candidate_scores(self.model, self.inputs, self.features, rows, self.batch_size, self.device)

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        rows = rows.reset_index(drop=True)
        out = rows[["sample_id", "user_id", "target_index"]].assign(scores=list(self.scores(rows)))
        if self.generate_ids is None:
            return out
        picked = (
            np.arange(len(rows))
            if self.generate_ids is True
            else np.flatnonzero(np.isin(rows["sample_id"].to_numpy(), self.generate_ids))
        )
        generated = np.full(len(rows), None, dtype=object)
        matched = np.full(len(rows), NOT_GENERATED, dtype=np.int16)
        if len(picked):
            texts, hits = generate_and_match(
                self.model,
                self.inputs,
                self.features,
                rows.iloc[picked],
                self.batch_size,
                self.device,
                self.generation.max_new_tokens,
                self.generation.fuzzy_cutoff,
            )
            generated[picked], matched[picked] = texts, hits
        # A string column even where a block has no answer (an all-None object column would be null-typed).
        return out.assign(generated=pd.array(generated, dtype="string"), matched=matched)


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
        feats = self.features.per_candidate(
            rows["user_id"].to_numpy(), rows["pos"].to_numpy(), rows["timestamp"].to_numpy(), cands
        )
        logits = self.model(feats).float().numpy().reshape(cands.shape)
        return rows[["sample_id", "user_id", "target_index"]].assign(scores=list(logits))


def ranking_rows(batch: dict) -> dict[str, np.ndarray]:
    """Per-row ranking metrics of a numpy batch of predictions (scores, target_index)."""
    return per_row_metrics(target_ranks(np.stack(batch["scores"]), batch["target_index"]))


def generation_rows(batch: dict) -> dict[str, np.ndarray]:
    matched, target = batch["matched"].astype(np.int64), batch["target_index"].astype(np.int64)
    return {"generated": matched != NOT_GENERATED, "valid": matched >= 0, "hit": matched == target}


def generation_metrics(counts: dict) -> dict:
    """iLoRA's generate-and-match figures from counts: HR@1 over valid answers, ValidRatio, and
    HR@1 over every generated answer (an invalid answer a miss)."""
    gen, valid, hit = (int(round(counts[k])) for k in ("generated", "valid", "hit"))
    return {
        "gen_n": gen,
        "valid_ratio": valid / gen if gen else float("nan"),
        "gen_hr@1": hit / valid if valid else float("nan"),
        "gen_hr@1_all": hit / gen if gen else float("nan"),
    }


def next_item_summary(staged: Path) -> dict:
    """HR@k, NDCG@k, MRR and n over the written predictions (`predictions.mean_metrics_of`); the generate-and-match
    figures where the predictions carry answers."""
    from reclora_ray.predictions import mean_metrics_of, shard_files, sums_of

    metrics = mean_metrics_of(staged, ["scores", "target_index"], ranking_rows)
    if "matched" in pq.read_schema(shard_files(staged)[0]).names:
        metrics |= generation_metrics(sums_of(staged, ["matched", "target_index"], generation_rows))
    return metrics


def _score_next(actor, ctor_kwargs: dict, stage: StageRun, num_gpus: float, info: dict) -> dict:
    cfg, out = stage.cfg, stage.out
    init_ray(cfg)  # ours, before Ray Data builds the dataset (which would start a default Ray)
    rows = split_rows(split_path(stage.run, "test"), actors=cfg.score.concurrency)
    metrics = score_with(
        actor,
        ctor_kwargs,
        rows,
        stage=stage,
        num_gpus=num_gpus,
        max_call_rows=max(cfg.score.batch_size * 4, 32),
        summarize=next_item_summary,
        info=info,
    )
    generated = (
        (
            f"; generated {metrics['gen_n']}: HR@1 {metrics['gen_hr@1']:.4f} over valid answers, "
            f"ValidRatio {metrics['valid_ratio']:.4f}"
        )
        if "gen_n" in metrics
        else ""
    )
    log.info(
        "%s (next item): HR@1 %.4f, NDCG@10 %.4f on %d test sequences%s -> %s",
        info["model"],
        metrics["hr@1"],
        metrics["ndcg@10"],
        metrics["n"],
        generated,
        out,
    )
    return metrics


def generate_ids(cfg: Config, run: RunDir) -> np.ndarray | bool | None:
    """The test sequences every LLM row also generates for: a fixed subsample (seed run.seed) of
    score.next_item.generate sequences; None when off."""
    n = cfg.score.next_item.generate
    if n == 0:
        return None
    ids = subsample_ids(split_path(run, "test"), n, cfg.run.seed)
    return True if ids is None else ids  # True: every sequence


def score_next_item(cfg: Config, run: RunDir, name: str, overwrite: bool = False) -> Path:
    """An LLM variant (its next-item adapter, or the base model) on the test sequences."""
    variant: Variant = get_variant(name)
    # What the scorer reads (the prepared data, the CRM a gate reads, the adapter): the stage table's.
    stage = StageRun("score-next-item", cfg, run, variant.name)
    run = stage.run.resolved()
    if stage.up_to_date(overwrite):
        return stage.out
    log.info("scoring %s on the next-item test sequences", variant.name)
    _score_next(
        NextItemScorer,
        {
            "cfg": cfg,
            "run": run,
            "variant_name": variant.name,
            "adapter": run.next_item_adapter(variant.name) if variant.adapter else None,
            "generate_ids": generate_ids(cfg, run),
        },
        stage,
        cfg.score.num_gpus,
        {"model": variant.name, "variant": variant.description},
    )
    return stage.out


def score_next_item_crm(cfg: Config, run: RunDir, variant_name: str, overwrite: bool = False) -> Path:
    """The CRM a variant's gate reads, alone, on the same candidates -> OUT/next-item/scores/crm-<name>/."""
    name = crm_name(cfg, get_variant(variant_name))
    stage = StageRun("score-next-item-crm", cfg, run, variant_name)
    run = stage.run.resolved()
    if stage.up_to_date(overwrite):
        return stage.out
    _score_next(
        NextItemCRMScorer,
        {"cfg": cfg, "run": run, "crm_dir": run.crm(name)},
        stage,
        0,
        {"model": f"crm-{name}", "variant": f"the CRM {name} alone"},
    )
    return stage.out


def run_stage(cfg: Config, run: RunDir, key: str, overwrite: bool = False) -> Path:
    """The `score-next-item` stage: OUT/next-item/scores/<variant>."""
    return score_next_item(cfg, run, key, overwrite)


def run_crm_stage(cfg: Config, run: RunDir, key: str, overwrite: bool = False) -> Path:
    """The `score-next-item-crm` stage: OUT/next-item/scores/crm-<the CRM of variant `key`>."""
    return score_next_item_crm(cfg, run, key, overwrite)

"""`reclora score`: batch scoring with Ray Data over an actor pool.

Each actor loads the base LLM, the adapter and the CRM once. A prompt costs one forward pass:
no `generate`, logits at the last position only, P(yes) = softmax(s_yes, s_no) (paper Eq. 16).
Prompts are grouped by token length so padded batches waste little. The CRM alone and the
zero-shot base model are scored on the same samples, so every row of the report compares like
with like. Output: OUT/scores/<name>/predictions.parquet (sample_id, user_id, item_id, label,
p_yes[, gate]) and metrics.json (AUC, LogLoss, n).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from reclora_ray.cli import add_common_arguments
from reclora_ray.config import Config
from reclora_ray.data.prepared import PreparedData
from reclora_ray.llm.collate import length_buckets, p_yes
from reclora_ray.llm.tune import BatchAssembler, _to_device, fingerprint, load_split_with_retrieval
from reclora_ray.llm.variants import Variant, crm_name, get_variant
from reclora_ray.metrics import binary_metrics
from reclora_ray.rundir import RunDir, check_can_write, read_marker, staged_output, write_json_atomic
from reclora_ray.runtime import config_from_args, init_ray, save_resolved_config

log = logging.getLogger(__name__)

KEEP = ["sample_id", "user_id", "item_id", "label"]


class LLMScorer:
    """Ray Data actor: base + adapter + CRM loaded once, then P(yes) for every row it is given."""

    def __init__(self, cfg: Config, out: str, variant_name: str):
        import torch

        from reclora_ray.llm.model import build_model

        run = RunDir(out)
        self.variant = get_variant(variant_name)
        self.device = torch.device("cuda" if torch.cuda.is_available() and cfg.score.num_gpus > 0 else "cpu")
        adapter = run.adapter(self.variant.name) if self.variant.adapter else None
        data = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
        self.model, tokenizer, encoder = build_model(cfg, run, self.variant, adapter, device=self.device)
        self.model.eval()
        self.assembler = BatchAssembler(cfg, data, self.variant, tokenizer, encoder)
        self.batch_size = cfg.score.batch_size

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        import torch

        from reclora_ray.llm import plora

        rows = rows.reset_index(drop=True)
        examples = self.assembler.builder.build(rows)
        collator = self.assembler.collator
        prompt_ids = collator.encode(examples.prompts)
        scores = np.zeros(len(rows), dtype=np.float32)
        gates = None
        for idx in length_buckets([len(p) for p in prompt_ids], self.batch_size):
            batch = collator.scoring_batch([prompt_ids[i] for i in idx])
            sub = rows.iloc[idx]
            if examples.long_history is not None:
                long = examples.long_history
                batch["crm_batch"] = self.assembler.encoder.encode(
                    sub["user_id"].to_numpy(), sub["item_id"].to_numpy(), sub["timestamp"].to_numpy(),
                    long.item_ids[idx], long.ratings[idx])
            batch = _to_device(batch, self.device)
            with torch.inference_mode():
                logits = self.model.last_logits(**batch)
                scores[idx] = p_yes(logits, collator.yes_id, collator.no_id).cpu().numpy()
                if self.variant.adapter == "plora":
                    alpha = plora.gate_weights(self.model.llm, self.model.crm_repr(batch["crm_batch"]))
                    if gates is None:
                        gates = np.zeros((len(rows), alpha.shape[-1]), dtype=np.float32)
                    gates[idx] = alpha.float().cpu().numpy()
        out = rows[KEEP].assign(p_yes=scores)
        if gates is not None:
            out["gate"] = list(gates)
        return out


class CRMScorer:
    """Ray Data actor: the CRM alone, sigmoid(logit), on the same rows as the LLMs."""

    def __init__(self, cfg: Config, out: str, crm_dir: str, history_mode: str):
        import torch

        from reclora_ray.crm import load_crm

        run = RunDir(out)
        self.cfg = cfg
        self.mode = history_mode
        self.data = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
        self.model, self.encoder = load_crm(Path(crm_dir))
        self.model.eval()
        self.torch = torch

    def __call__(self, rows: pd.DataFrame) -> pd.DataFrame:
        from reclora_ray.llm.histories import history_batch

        rows = rows.reset_index(drop=True)
        long = history_batch(self.data.sequences, rows["user_id"].to_numpy(), rows["pos"].to_numpy(),
                             self.cfg.retrieve.k_long, self.mode,
                             rows["hist_long"].to_numpy() if "hist_long" in rows else None)
        batch = self.encoder.encode(rows["user_id"].to_numpy(), rows["item_id"].to_numpy(),
                                    rows["timestamp"].to_numpy(), long.item_ids, long.ratings)
        with self.torch.inference_mode():
            probs = self.torch.sigmoid(self.model(batch)).float().numpy()
        return rows[KEEP].assign(p_yes=probs)


def test_rows(cfg: Config, run: RunDir, variant: Variant) -> pd.DataFrame:
    rows = load_split_with_retrieval(run, "test", variant)
    n = cfg.data.test_subsample
    if n and n < len(rows):
        rows = rows.sample(n=n, random_state=cfg.run.seed).sort_values("sample_id", ignore_index=True)
    return rows


def _score_with(actor, ctor_kwargs: dict, rows: pd.DataFrame, cfg: Config, out: Path, fp: str,
                num_gpus: float, extra: dict) -> dict:
    import ray.data

    init_ray(cfg)
    block_rows = max(cfg.score.batch_size * 4, 64)
    ds = ray.data.from_pandas(rows, override_num_blocks=max(1, len(rows) // block_rows))
    scored = ds.map_batches(actor, fn_constructor_kwargs=ctor_kwargs, batch_size=block_rows,
                            batch_format="pandas", concurrency=cfg.score.concurrency, num_gpus=num_gpus)
    preds = scored.to_pandas().sort_values("sample_id", ignore_index=True)
    metrics = binary_metrics(preds["label"].to_numpy(), preds["p_yes"].to_numpy()) | extra
    with staged_output(out, fp) as tmp:
        preds.to_parquet(tmp / "predictions.parquet", index=False)
        write_json_atomic(tmp / "metrics.json", metrics)
        save_resolved_config(cfg, tmp)
    log.info("%s: AUC %.4f, LogLoss %.4f on %d test samples -> %s",
             extra.get("model"), metrics["auc"], metrics["logloss"], metrics["n"], out)
    return metrics


def score_variant(cfg: Config, run: RunDir, name: str, overwrite: bool = False) -> Path:
    variant = get_variant(name)
    out = run.scores(variant.name)
    adapter_fp = None
    if variant.adapter:
        marker = read_marker(run.adapter(variant.name))
        if marker is None:
            raise FileNotFoundError(f"{run.adapter(variant.name)} holds no adapter; run `reclora tune` first")
        adapter_fp = marker["fingerprint"]
    fp = f"{fingerprint(cfg, variant)}-{adapter_fp or 'base'}-{cfg.section_hash('score')}"
    if not check_can_write(out, fp, overwrite):
        return out
    rows = test_rows(cfg, run, variant)
    log.info("scoring %s on %d test samples", variant.name, len(rows))
    _score_with(LLMScorer, {"cfg": cfg, "out": str(run.root.resolve()), "variant_name": variant.name},
                rows, cfg, out, fp, cfg.score.num_gpus, {"model": variant.name, "variant": variant.description})
    return out


def score_crm(cfg: Config, run: RunDir, history_mode: str = "semantic", overwrite: bool = False) -> Path:
    """The CRM alone on the same test rows (its own test metrics are on the whole split)."""
    variant = get_variant("reclora" if history_mode == "semantic" else "wo-both-retrievers")
    name = crm_name(cfg, variant)
    crm_dir = run.crm(name)
    marker = read_marker(crm_dir)
    if marker is None:
        raise FileNotFoundError(f"{crm_dir} holds no CRM; run `reclora pretrain-crm` first")
    out = run.scores(f"crm-{name}")
    fp = f"crm-{marker['fingerprint']}-{cfg.section_hash('data', 'retrieve', 'score', 'run')}"
    if not check_can_write(out, fp, overwrite):
        return out
    rows = test_rows(cfg, run, variant)
    _score_with(CRMScorer, {"cfg": cfg, "out": str(run.root.resolve()), "crm_dir": str(crm_dir),
                            "history_mode": variant.long_mode},
                rows, cfg, out, fp, 0, {"model": f"crm-{name}"})
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--variant", action="append",
                        help="variant(s) to score (default: zero-shot, the CRM, and tune.variants)")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run = RunDir(args.out)
    if args.variant:
        names = args.variant
    else:
        names = (["zero-shot"] if cfg.score.zero_shot else []) + list(cfg.tune.variants)
        score_crm(cfg, run, overwrite=args.overwrite)
    for name in names:
        score_variant(cfg, run, name, overwrite=args.overwrite)
    print(json.dumps({n: json.loads((run.scores(n) / "metrics.json").read_text()) for n in names}, indent=2))
    return 0

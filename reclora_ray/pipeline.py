"""`reclora run`: prepare -> embed -> retrieve -> pretrain-crm -> tune -> score -> report.

Every stage checks its own output's fingerprint, so a re-run skips finished stages and resumes
where the last run stopped; `--overwrite` redoes stages whose config changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

from reclora_ray.cli import add_common_arguments
from reclora_ray.config import Config
from reclora_ray.console import stage_line
from reclora_ray.llm.variants import crm_config, crm_name, get_variant
from reclora_ray.rundir import RunDir
from reclora_ray.runtime import config_from_args, save_resolved_config

log = logging.getLogger(__name__)


def run_pipeline(cfg: Config, out: str, overwrite: bool = False) -> dict:
    """Every stage in order; returns OUT/metrics.json: {"models": {name: {"auc", "logloss", ...}}}."""
    from reclora_ray.crm.train import pretrain_crm
    from reclora_ray.data.prepare import prepare_dataset
    from reclora_ray.llm.score import score_crm, score_variant
    from reclora_ray.llm.tune import tune_variant
    from reclora_ray.report import write_report
    from reclora_ray.retrieval.embed import embed_items
    from reclora_ray.retrieval.retrieve import retrieve_histories

    run = RunDir(out)
    run.root.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, run.root)
    tuned = [get_variant(v) for v in cfg.tune.variants]
    scored = ([get_variant("zero-shot")] if cfg.score.zero_shot else []) + tuned
    gated = [v for v in tuned if v.uses_crm] or [get_variant("reclora")]  # the CRM row needs one
    timings: dict[str, float] = {}

    def stage(name, fn, *args):
        start = time.perf_counter()
        with stage_line(log, name):
            result = fn(*args)
        timings[name] = round(time.perf_counter() - start, 1)
        return result

    stage("prepare", prepare_dataset, cfg, run.data, overwrite)
    stage("embed", embed_items, cfg, run.root, overwrite)
    stage("retrieve", retrieve_histories, cfg, run.root, overwrite)
    for crm in {crm_name(cfg, v): crm_config(cfg, v) for v in gated}.values():
        stage(f"pretrain-crm {crm.model} ({crm.history} history)", pretrain_crm,
              dataclasses.replace(cfg, crm=crm), run.root, overwrite)
    for variant in tuned:
        stage(f"tune {variant.name}", tune_variant, cfg, run, variant.name, overwrite)
    stage("score the CRM", score_crm, cfg, run, gated[0].name, overwrite)
    for variant in scored:
        stage(f"score {variant.name}", score_variant, cfg, run, variant.name, overwrite)
    notes = [
        f"dataset {cfg.data.dataset}; LLM {cfg.llm.model} ({_computed_dtype(run, scored)}"
        f"{', 8-bit' if cfg.llm.load_in_8bit else ''}); CRM {cfg.crm.model}",
        f"few-shot set: {cfg.tune.few_shot} training samples drawn uniformly (seed {cfg.run.seed}), "
        f"{cfg.tune.epochs} epoch(s), the best kept by validation AUC on {cfg.tune.valid_subsample or 'all'} "
        "validation samples",
        "test: " + (f"the LLM rows on a fixed random subsample of {cfg.score.llm_subsample} samples (seed "
                    f"{cfg.run.seed}), the CRM on the whole split" if cfg.score.llm_subsample else "the whole split")
        + (f" (itself a fixed subsample of {cfg.data.test_subsample})" if cfg.data.test_subsample else ""),
        f"histories: {cfg.retrieve.k_long} behaviours for the CRM, {cfg.retrieve.k_short} in the prompt",
        "stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
    ]
    return stage("report", write_report, run, notes)


def _computed_dtype(run: RunDir, scored) -> str:
    """The dtype the LLM rows computed in, as the scoring actors resolved llm.dtype."""
    found = {json.loads(path.read_text()).get("dtype") for v in scored
             if (path := run.scores(v.name) / "metrics.json").exists()}
    return ", ".join(sorted(d for d in found if d)) or "dtype unknown"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--task", choices=["ctr", "next-item"], default="ctr",
                        help="ctr: the paper's Table 2; next-item: ranking 20 candidates (OUT/next-item/report.md)")


def main(args: argparse.Namespace) -> int:
    if args.task == "next-item":
        from reclora_ray.next_item_pipeline import run_next_item

        print(json.dumps(run_next_item(config_from_args(args), args.out, overwrite=args.overwrite), indent=2))
        return 0
    metrics = run_pipeline(config_from_args(args), args.out, overwrite=args.overwrite)
    print(json.dumps(metrics, indent=2))
    return 0

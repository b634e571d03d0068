"""`reclora run --task next-item`: the whole pipeline for next-item ranking (iLoRA's task).

prepare (which writes the candidate sets) -> embed -> retrieve -> pretrain the CRM of every gated
variant -> tune each of tune.variants on the next-item task -> score the CRMs alone, the zero-shot
LLM and every tuned variant on the same test candidates -> OUT/next-item/report.md. The upstream
stages are the CTR pipeline's (shared, skipped when done); the task's own outputs live under
OUT/next-item/.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from reclora_ray.config import Config
from reclora_ray.llm.variants import crm_config, crm_name, get_variant
from reclora_ray.rundir import RunDir
from reclora_ray.runtime import save_resolved_config

log = logging.getLogger(__name__)


def run_next_item(cfg: Config, out: str, overwrite: bool = False) -> dict:
    from reclora_ray.crm.train import pretrain_crm
    from reclora_ray.data.prepare import prepare_dataset
    from reclora_ray.llm.next_item_report import write_next_item_report
    from reclora_ray.llm.next_item_score import score_next_item, score_next_item_crm
    from reclora_ray.llm.next_item_tune import tune_next_item
    from reclora_ray.retrieval.embed import embed_items
    from reclora_ray.retrieval.retrieve import retrieve_histories

    run = RunDir(out)
    run.root.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, run.root)
    tuned = [get_variant(v) for v in cfg.tune.variants]
    gated = [v for v in tuned if v.uses_crm]
    timings: dict[str, float] = {}

    def stage(name, fn, *args):
        start = time.perf_counter()
        log.info("==> %s", name)
        result = fn(*args)
        timings[name] = round(time.perf_counter() - start, 1)
        return result

    stage("prepare", prepare_dataset, cfg, run.data, overwrite)
    if any(v.needs_retrieval for v in gated):  # a gate whose CRM was trained on the retrieved history
        stage("embed", embed_items, cfg, run.root, overwrite)
        stage("retrieve", retrieve_histories, cfg, run.root, overwrite)
    crms = {crm_name(cfg, v): (v, crm_config(cfg, v)) for v in gated}
    for variant, crm in crms.values():
        stage(f"pretrain-crm {crm.model} ({crm.history} history)", pretrain_crm,
              dataclasses.replace(cfg, crm=crm), run.root, overwrite)
    for variant in tuned:
        stage(f"tune {variant.name} (next item)", tune_next_item, cfg, run, variant.name, overwrite)
    for name, (variant, _) in crms.items():
        stage(f"score the CRM {name} (next item)", score_next_item_crm, cfg, run, variant.name, overwrite)
    for variant in ([get_variant("zero-shot")] if cfg.score.zero_shot else []) + tuned:
        stage(f"score {variant.name} (next item)", score_next_item, cfg, run, variant.name, overwrite)
    n = cfg.data.next_item
    notes = [
        f"dataset {cfg.data.dataset}; LLM {cfg.llm.model} ({cfg.llm.dtype}); few-shot set: {cfg.tune.few_shot} "
        f"next-item training sequences (seed {cfg.run.seed})",
        f"prompt: the last {n.history} behaviours and {n.candidates} candidate titles; scores: mean log-likelihood "
        "of each candidate's title (one shared prefix pass); CRMs read the recent history, gates get no target",
        "stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
    ]
    return stage("report", write_next_item_report, run, notes)

"""The next-item report: HR@k, NDCG@k, MRR per model with CIs by bootstrap over users, and paired
comparisons (each method against plain LoRA and against RecLoRA) on the identical candidates; and
iLoRA's generate-and-match figures (HR@1 over valid answers, ValidRatio) where the LLM rows made them.

Writes OUT/next-item/report.md and OUT/next-item/metrics.json.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from reclora_ray import storage
from reclora_ray.metrics import bootstrap_mean
from reclora_ray.predictions import read_predictions, scored_outputs
from reclora_ray.ranking import chance_metrics, per_row_metrics, target_ranks
from reclora_ray.report import DISPLAY, _order
from reclora_ray.rundir import RunDir, write_json_atomic

log = logging.getLogger(__name__)

COLUMNS = ("hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr")
WITH_CI = ("hr@1", "ndcg@10")
BASELINES = ("tallrec", "reclora")  # plain LoRA on the same prompt, and RecLoRA


def per_row(run: RunDir) -> dict[str, pd.DataFrame]:
    """Each scored model's per-sequence metrics, indexed by sample_id, on the rows all models share."""
    found = {}
    for path in scored_outputs(run.next_item / "scores"):
        preds = read_predictions(path, ["sample_id", "user_id", "target_index", "scores"])
        ranks = target_ranks(np.stack(preds["scores"].to_numpy()), preds["target_index"].to_numpy())
        found[path.name] = pd.DataFrame(per_row_metrics(ranks), index=preds["sample_id"]).assign(
            user_id=preds["user_id"].to_numpy()
        )
    if not found:
        raise FileNotFoundError(f"no next-item scores under {run.next_item / 'scores'}")
    common = sorted(set.intersection(*(set(f.index) for f in found.values())))
    return {name: frame.loc[common] for name, frame in found.items()}


def summarize(rows: dict[str, pd.DataFrame], n_boot: int = 1000, seed: int = 0) -> dict:
    models, paired = {}, {}
    for name, frame in rows.items():
        users = frame["user_id"].to_numpy()
        models[name] = {c: float(frame[c].mean()) for c in COLUMNS} | {"n": len(frame)}
        for c in WITH_CI:
            ci = bootstrap_mean(frame[c].to_numpy(), users, n_boot, seed)
            models[name][f"{c}_ci"] = [ci["lo"], ci["hi"]]
    for base in BASELINES:
        if base not in rows:
            continue
        for name, frame in rows.items():
            if name == base:
                continue
            diff = frame["hr@1"].to_numpy() - rows[base]["hr@1"].to_numpy()
            ci = bootstrap_mean(diff, frame["user_id"].to_numpy(), n_boot, seed)
            paired[f"{name} - {base}"] = {
                "metric": "hr@1",
                "diff": ci["mean"],
                "ci": [ci["lo"], ci["hi"]],
                "p_value": ci["p_value"],
            }
    return {"models": models, "paired": paired}


GENERATED = ("gen_hr@1", "valid_ratio", "gen_hr@1_all", "gen_n")


def generation(run: RunDir) -> dict:
    """The generate-and-match figures each LLM row's scoring stage wrote (its metrics.json), by model:
    every row generated for the same fixed subsample of the test sequences."""
    found = {}
    for path in scored_outputs(run.next_item / "scores"):
        metrics_file = path / "metrics.json"
        if metrics_file.is_file() and "gen_n" in (m := json.loads(metrics_file.read_text())):
            found[path.name] = {k: m[k] for k in GENERATED}
    return found


def generation_table(found: dict) -> list[str]:
    lines = [
        "## Generate and match (iLoRA's evaluation)",
        "",
        "| Model | HR@1 (valid answers) | ValidRatio | HR@1 (all answers) | sequences |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(found, key=_order):
        m = found[name]
        lines.append(
            f"| {DISPLAY.get(name, name)} | {m['gen_hr@1']:.4f} | {m['valid_ratio']:.4f} | "
            f"{m['gen_hr@1_all']:.4f} | {m['gen_n']} |"
        )
    return lines + [
        "",
        "Each LLM answers by greedy generation on the same fixed subsample of the test sequences; "
        "the answer's first line names a candidate when, normalized (case, Unicode, quotes, outer "
        "punctuation), it equals a title, equals one less its year, contains exactly one title, or is "
        "within a difflib ratio of score.next_item.fuzzy_cutoff of exactly one best title; otherwise it "
        "is invalid. HR@1 (valid answers) is iLoRA's; HR@1 (all answers) counts an invalid answer as a miss.",
        "",
    ]


def _fmt(m: dict, c: str) -> str:
    if f"{c}_ci" in m:
        lo, hi = m[f"{c}_ci"]
        return f"{m[c]:.4f} [{lo:.3f}, {hi:.3f}]"
    return f"{m[c]:.4f}"


def write_next_item_report(run: RunDir, notes: list[str] | None = None, candidates: int | None = None) -> dict:
    """`candidates` (the task's C) adds the expected figures of a random order as the table's last row."""
    summary = summarize(per_row(run))
    summary["generate"] = generation(run)
    if candidates:
        summary["chance"] = chance_metrics(candidates) | {"candidates": candidates}
    lines = [
        "# Next-item ranking report",
        "",
        "| Model | " + " | ".join(c.upper() for c in COLUMNS) + " | n |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for name in sorted(summary["models"], key=_order):
        m = summary["models"][name]
        lines.append(f"| {DISPLAY.get(name, name)} | " + " | ".join(_fmt(m, c) for c in COLUMNS) + f" | {m['n']} |")
    if "chance" in summary:
        chance = summary["chance"]
        lines.append("| Chance (a random order) | " + " | ".join(f"{chance[c]:.4f}" for c in COLUMNS) + " | – |")
    lines += [
        "",
        (
            f"{candidates} candidates per test sequence: the next item and {candidates - 1}"
            if candidates
            else "Candidates per test sequence: the next item and"
        )
        + " never-seen items, fixed by the seed. 95% CIs by bootstrap over users.",
        "",
    ]
    if summary["paired"]:
        lines += [
            "## Paired comparisons (HR@1, same sequences)",
            "",
            "| Comparison | Diff | 95% CI | p |",
            "|---|---|---|---|",
        ]
        for key, p in summary["paired"].items():
            lines.append(f"| {key} | {p['diff']:+.4f} | [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}] | {p['p_value']:.3f} |")
        lines.append("")
    if summary["generate"]:
        lines += generation_table(summary["generate"])
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    root = run.next_item
    write_json_atomic(root / "metrics.json", summary)
    storage.write_text(root / "report.md", "\n".join(lines))
    log.info("wrote %s", root / "report.md")
    return summary


def run_stage(cfg, run: RunDir, key=None, overwrite: bool = False, timings: dict | None = None) -> dict:
    """The `report-next-item` stage: OUT/next-item/report.md and metrics.json."""
    n = cfg.data.next_item
    notes = [
        f"dataset {cfg.data.dataset}; LLM {cfg.llm.model} ({cfg.llm.dtype}); few-shot set: {cfg.tune.few_shot} "
        f"next-item training sequences (seed {cfg.run.seed})",
        f"prompt: the last {n.history} behaviours and {n.candidates} candidate titles; scores: mean log-likelihood "
        "of each candidate's title (one shared prefix pass); CRMs read the recent history, gates get no target",
        "stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in (timings or {}).items()),
    ]
    return write_next_item_report(run, notes, candidates=n.candidates)

"""`reclora report`: one comparison table in the paper's Table 2 form, plus PNG plots.

Reads every scored model under OUT/scores/<name>/ (metrics.json + the predictions' Parquet shards,
or an older run's single predictions.parquet: `predictions.read_predictions`; predictions carry sample_id, user_id, item_id, label, p_yes and, for personalized-LoRA variants,
the per-sample gate weights `gate`). Models are compared only on the samples they all scored, with
bootstrap-over-users confidence intervals and paired differences to RecLoRA (`evaluate`). Writes
OUT/report.md, OUT/metrics.json (evaluate's payload), OUT/roc.png and, when gates exist, OUT/gates.png.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from reclora_ray import storage
from reclora_ray.curves import plot_curves
from reclora_ray.metrics import BOOTSTRAP_ROUNDS, binary_metrics, bootstrap_metrics, interval, paired_p_value, rel_impr
from reclora_ray.predictions import has_predictions, read_predictions, scored_outputs, shard_files
from reclora_ray.rundir import MARKER, RunDir, write_json_atomic

log = logging.getLogger(__name__)

OURS = "reclora"
# Display names and table order: ID-based rows first, then the LLM-based ones, ours last.
DISPLAY = {
    "crm-deepfm": "DeepFM",
    "crm-autoint": "AutoInt",
    "crm-dcnv2": "DCNv2",
    "crm-gru4rec": "GRU4Rec",
    "crm-caser": "Caser",
    "crm-sasrec": "SASRec",
    "crm-sasrec-recent": "SASRec (recent history)",
    "crm-din": "DIN",
    "crm-sim": "SIM",
    "zero-shot": "Zero-shot LLM",
    "tallrec": "TALLRec-style LoRA",
    "rella": "ReLLa-style LoRA",
    "wo-meta-lora": "RecLoRA (w/o meta-LoRA)",
    "wo-meta-lora-same-params": "RecLoRA (w/o meta-LoRA same param)",
    "wo-long-retriever": "RecLoRA (w/o long retriever)",
    "wo-short-retriever": "RecLoRA (w/o short retriever)",
    "wo-both-retrievers": "RecLoRA (w/o long-short retriever)",
    "ilora": "iLoRA (SASRec gate)",
    OURS: "RecLoRA",
}


def collect_scores(run: RunDir) -> dict[str, pd.DataFrame]:
    """Predictions of every finished scoring output (sample_id, user_id, label, p_yes), by name."""
    return {
        path.name: read_predictions(path, ["sample_id", "user_id", "label", "p_yes"])
        for path in scored_outputs(run.root / "scores")
    }


def _order(name: str) -> tuple[int, str]:
    keys = list(DISPLAY)
    return (keys.index(name) if name in keys else len(keys) - 1, name)


def evaluate(preds: dict[str, pd.DataFrame], rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> dict:
    """Every model on the test samples they all scored, with 95% CIs from a bootstrap over users,
    and each model's paired difference to RecLoRA on the same resamples; and every model that
    scored more than those (the CRM on the whole split) on its own samples.

    {"models": {name: {auc, auc_ci, logloss, logloss_ci, n, users}},
     "vs_reclora": {name: {delta_auc, delta_auc_ci, p_value, delta_logloss, delta_logloss_ci}},
     "own_samples": {name: {... as models}}}"""
    common = None
    for df in preds.values():
        ids = set(df["sample_id"])
        common = ids if common is None else common & ids
    if not common:
        raise ValueError(f"the scored models {sorted(preds)} share no test sample: score them on the same split")
    ids = np.array(sorted(common))
    aligned = {name: df.set_index("sample_id").loc[ids] for name, df in preds.items()}
    first = next(iter(aligned.values()))
    labels, users = first["label"].to_numpy(), first["user_id"].to_numpy()
    for name, df in aligned.items():
        if not np.array_equal(df["label"].to_numpy(), labels):
            raise ValueError(f"scores/{name} disagrees with the other models on the labels of the same samples")
    probs = {name: df["p_yes"].to_numpy() for name, df in aligned.items()}
    reps = bootstrap_metrics(labels, users, probs, rounds, seed)
    payload = {"models": _summaries(labels, users, probs, reps), "vs_reclora": {}, "own_samples": {}}
    if OURS in probs:
        point = payload["models"]
        for name in probs:
            if name == OURS:
                continue
            diff = reps[OURS] - reps[name]
            payload["vs_reclora"][name] = {
                "delta_auc": point[OURS]["auc"] - point[name]["auc"],
                "delta_auc_ci": interval(diff[:, 0]),
                "p_value": paired_p_value(diff[:, 0]),
                "delta_logloss": point[OURS]["logloss"] - point[name]["logloss"],
                "delta_logloss_ci": interval(diff[:, 1]),
            }
    for name, df in preds.items():
        if len(df) > len(ids):
            own_labels, own_users, own = (
                df["label"].to_numpy(),
                df["user_id"].to_numpy(),
                {name: df["p_yes"].to_numpy()},
            )
            own_reps = bootstrap_metrics(own_labels, own_users, own, rounds, seed)
            payload["own_samples"][name] = _summaries(own_labels, own_users, own, own_reps)[name]
    return payload


def _summaries(labels, users, probs: dict, reps: dict) -> dict:
    out = {}
    for name, p in probs.items():
        m = binary_metrics(labels, p)
        out[name] = {
            "auc": m["auc"],
            "auc_ci": interval(reps[name][:, 0]),
            "logloss": m["logloss"],
            "logloss_ci": interval(reps[name][:, 1]),
            "n": m["n"],
            "users": int(len(np.unique(users))),
        }
    return out


def _ci(value: float, ci) -> str:
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def _p(p: float, rounds: int) -> str:
    return f"< {1 / rounds:.3f}" if p <= 1 / rounds else f"{p:.3f}"


def comparison_table(payload: dict, rounds: int = BOOTSTRAP_ROUNDS) -> str:
    """Markdown: Model | Group | AUC [95% CI] | LogLoss [95% CI] | RecLoRA − model: ΔAUC [95% CI] | p | Rel.Impr."""
    models, versus = payload["models"], payload.get("vs_reclora", {})
    ours = models.get(OURS, {}).get("auc")
    lines = [
        "| Model | Group | AUC [95% CI] | LogLoss [95% CI] | RecLoRA − model: ΔAUC [95% CI] | p | Rel.Impr |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(models, key=_order):
        m = models[name]
        group = "ID-based" if name.startswith("crm-") else "LLM-based"
        delta, p, impr = "-", "-", "-"
        if name in versus:
            v = versus[name]
            delta = f"{v['delta_auc']:+.4f} [{v['delta_auc_ci'][0]:+.4f}, {v['delta_auc_ci'][1]:+.4f}]"
            p = _p(v["p_value"], rounds)
        if name != OURS and ours is not None and np.isfinite(m["auc"]) and m["auc"] > 0:
            impr = f"{100 * rel_impr(ours, m['auc']):+.2f}%"
        lines.append(
            f"| {DISPLAY.get(name, name)} | {group} | {_ci(m['auc'], m['auc_ci'])} | "
            f"{_ci(m['logloss'], m['logloss_ci'])} | {delta} | {p} | {impr} |"
        )
    return "\n".join(lines)


def own_samples_table(payload: dict) -> str:
    lines = ["| Model | AUC [95% CI] | LogLoss [95% CI] | n | users |", "|---|---|---|---|---|"]
    for name in sorted(payload["own_samples"], key=_order):
        m = payload["own_samples"][name]
        lines.append(
            f"| {DISPLAY.get(name, name)} | {_ci(m['auc'], m['auc_ci'])} | {_ci(m['logloss'], m['logloss_ci'])} "
            f"| {m['n']} | {m['users']} |"
        )
    return "\n".join(lines)


def plot_roc(run: RunDir, names: list[str], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    drawn = False
    for name in sorted(names, key=_order):
        if not has_predictions(run.scores(name)):
            continue
        df = read_predictions(run.scores(name), ["label", "p_yes"])
        if df["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(df["label"], df["p_yes"])
        ax.plot(fpr, tpr, label=DISPLAY.get(name, name), lw=1.4)
        drawn = True
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC on the test split")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_gates(run: RunDir, name: str, path: Path) -> bool:
    """Distribution of the personalized-LoRA gate: mean weight per meta-LoRA, and how peaked
    each user's mix is (max weight per user)."""
    files = shard_files(run.scores(name))
    if not files or "gate" not in pq.read_schema(files[0]).names:
        return False
    df = read_predictions(run.scores(name), ["user_id", "gate"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = np.stack(df["gate"].to_numpy())
    per_user = pd.DataFrame(gates).groupby(df["user_id"].to_numpy()).mean().to_numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.boxplot(per_user, showfliers=False)
    left.set(
        xlabel="meta-LoRA k",
        ylabel="gate weight alpha_k (per-user mean)",
        title=f"Gate weights over {len(per_user)} users",
    )
    right.hist(per_user.max(axis=1), bins=30, color="tab:orange")
    right.axvline(1 / gates.shape[1], ls="--", c="grey", label="uniform 1/N_m")
    right.set(xlabel="largest gate weight of the user", ylabel="users", title="How personalized each mix is")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def validation_metrics(run: RunDir) -> dict[str, dict]:
    """Each tuned adapter's validation figures at the epoch tuning kept (what a sweep selects on):
    {variant: {"auc", "logloss", "epoch", "samples"}}, from OUT/adapter/<variant>/train_metrics.json."""
    out = {}
    for path in sorted((run.root / "adapter").glob("*/train_metrics.json")):
        if path.parent.name.startswith(".") or not (path.parent / MARKER).is_file():
            continue  # a staging folder of a tuning that did not finish
        metrics = json.loads(path.read_text())
        best = next(h for h in metrics["history"] if h["epoch"] == metrics["best_epoch"])
        out[path.parent.name] = {
            "auc": best["val_auc"],
            "logloss": best["val_logloss"],
            "epoch": best["epoch"],
            "samples": metrics.get("valid"),  # not kept by adapters tuned before it was
        }
    return out


def write_report(run: RunDir, notes: list[str] | None = None, rounds: int = BOOTSTRAP_ROUNDS) -> dict:
    preds = collect_scores(run)
    if not preds:
        raise FileNotFoundError(f"no scored models under {run.root / 'scores'}; run `reclora score` first")
    payload = evaluate(preds, rounds)
    payload["bootstrap"] = {"unit": "user", "rounds": rounds, "level": 0.95}
    payload["valid"] = validation_metrics(run)
    write_json_atomic(run.root / "metrics.json", payload)
    first = next(iter(payload["models"].values()))
    parts = [
        "# RecLoRA run report",
        "",
        f"Every model on the same {first['n']:,} test samples ({first['users']} users):",
        "",
        comparison_table(payload, rounds),
        "",
        f"95% confidence intervals from {rounds} bootstrap resamples of users (a user's samples are not "
        "independent); ΔAUC and its p-value are paired: RecLoRA and the row on the same resamples. "
        "Rel.Impr: relative AUC improvement of RecLoRA over the row, as in the paper's Table 2.",
        "",
    ]
    if payload["own_samples"]:
        parts += [
            "Models that also scored more samples, on all of theirs (not comparable with the table above):",
            "",
            own_samples_table(payload),
            "",
        ]
    if plot_roc(run, list(preds), run.root / "roc.png"):
        parts += ["![ROC curves](roc.png)", ""]
    if plot_gates(run, OURS, run.root / "gates.png"):
        parts += ["![Gate weights](gates.png)", ""]
    examples = next((run.scores(n) for n in (OURS, *sorted(preds)) if has_predictions(run.scores(n))), None)
    if examples is not None and (run.data / "items.parquet").is_file():
        from reclora_ray.data.catalogue import example_rows

        parts += [
            f"## Examples ({examples.name}, catalogue ids)",
            "",
            example_rows(run.data, read_predictions(examples, ["sample_id", "user_id", "item_id", "label", "p_yes"])),
            "",
        ]
    if plot_curves(run.root, run.root / "curves.png"):
        parts += ["![Training loss and validation curves](curves.png)", ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    storage.write_text(run.report, "\n".join(parts))
    log.info("wrote %s", run.report)
    return payload


def run_stage(cfg, run: RunDir, key=None, overwrite: bool = False, timings: dict | None = None) -> dict:
    """The `report` stage of the stage table: OUT/report.md and OUT/metrics.json, with notes on
    what the run was under `cfg` (and the stage wall times, when `reclora run` gives them)."""
    return write_report(run, run_notes(cfg, run, timings))


def run_notes(cfg, run: RunDir, timings: dict | None = None) -> list[str]:
    """What a run was: dataset, models, few-shot set, test samples, histories, stage wall times."""
    scored = (["zero-shot"] if cfg.score.zero_shot else []) + list(cfg.tune.variants)
    return [
        f"dataset {cfg.data.dataset}; LLM {cfg.llm.model} ({_computed_dtype(run, scored)}"
        f"{', 8-bit' if cfg.llm.load_in_8bit else ''}); CRM {cfg.crm.model}",
        f"few-shot set: {cfg.tune.few_shot} training samples drawn uniformly (seed {cfg.run.seed}), "
        f"{cfg.tune.epochs} epoch(s), the best kept by validation AUC on {cfg.tune.valid_subsample or 'all'} "
        "validation samples",
        "test: "
        + (
            f"the LLM rows on a fixed random subsample of {cfg.score.llm_subsample} samples (seed "
            f"{cfg.run.seed}), the CRM on the whole split"
            if cfg.score.llm_subsample
            else "the whole split"
        )
        + (f" (itself a fixed subsample of {cfg.data.test_subsample})" if cfg.data.test_subsample else ""),
        f"histories: {cfg.retrieve.k_long} behaviours for the CRM, {cfg.retrieve.k_short} in the prompt",
    ] + (["stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items())] if timings else [])


def _computed_dtype(run: RunDir, scored: list[str]) -> str:
    """The dtype the LLM rows computed in, as the scoring actors resolved llm.dtype."""
    found = {
        json.loads(path.read_text()).get("dtype")
        for name in scored
        if (path := run.scores(name) / "metrics.json").exists()
    }
    return ", ".join(sorted(d for d in found if d)) or "dtype unknown"

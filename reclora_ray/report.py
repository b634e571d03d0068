"""`reclora report`: one comparison table in the paper's Table 2 form, plus PNG plots.

Reads every scored model under OUT/scores/<name>/ (metrics.json + predictions.parquet, where
predictions carry sample_id, user_id, item_id, label, p_yes and, for personalized-LoRA variants,
the per-sample gate weights `gate`). Writes OUT/report.md, OUT/metrics.json
({"models": {name: {"auc", "logloss", "n"}}}), OUT/roc.png and, when gates exist, OUT/gates.png.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from reclora_ray.metrics import rel_impr
from reclora_ray.rundir import RunDir, write_json_atomic

log = logging.getLogger(__name__)

OURS = "reclora"
# Display names and table order: ID-based rows first, then the LLM-based ones, ours last.
DISPLAY = {
    "crm-deepfm": "DeepFM", "crm-autoint": "AutoInt", "crm-dcnv2": "DCNv2", "crm-gru4rec": "GRU4Rec",
    "crm-caser": "Caser", "crm-sasrec": "SASRec", "crm-sasrec-recent": "SASRec (recent history)", "crm-din": "DIN", "crm-sim": "SIM",
    "zero-shot": "Zero-shot LLM", "tallrec": "TALLRec-style LoRA", "rella": "ReLLa-style LoRA",
    "wo-meta-lora": "RecLoRA (w/o meta-LoRA)", "wo-meta-lora-same-params": "RecLoRA (w/o meta-LoRA same param)",
    "wo-long-retriever": "RecLoRA (w/o long retriever)", "wo-short-retriever": "RecLoRA (w/o short retriever)",
    "wo-both-retrievers": "RecLoRA (w/o long-short retriever)", "ilora": "iLoRA (SASRec gate)", OURS: "RecLoRA",
}


def collect_scores(run: RunDir) -> dict[str, dict]:
    """Metrics of every finished scoring output, keyed by score name."""
    found = {}
    for path in sorted((run.root / "scores").glob("*/metrics.json")):
        found[path.parent.name] = json.loads(path.read_text())
    return found


def _order(name: str) -> tuple[int, str]:
    keys = list(DISPLAY)
    return (keys.index(name) if name in keys else len(keys) - 1, name)


def comparison_table(scores: dict[str, dict]) -> str:
    """Markdown table: Model | Group | AUC | LogLoss | Rel.Impr of RecLoRA over the row."""
    ours = scores.get(OURS, {}).get("auc")
    lines = ["| Model | Group | AUC | LogLoss | Rel.Impr | n |", "|---|---|---|---|---|---|"]
    for name in sorted(scores, key=_order):
        m = scores[name]
        group = "ID-based" if name.startswith("crm-") else "LLM-based"
        if name == OURS or ours is None or not np.isfinite(m["auc"]):
            impr = "-"
        else:
            impr = f"{100 * rel_impr(ours, m['auc']):+.2f}%"
        lines.append(
            f"| {DISPLAY.get(name, name)} | {group} | {m['auc']:.4f} | {m['logloss']:.4f} | {impr} | {m['n']} |"
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
        preds = run.scores(name) / "predictions.parquet"
        if not preds.exists():
            continue
        df = pd.read_parquet(preds, columns=["label", "p_yes"])
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
    preds = run.scores(name) / "predictions.parquet"
    if not preds.exists():
        return False
    df = pd.read_parquet(preds)
    if "gate" not in df.columns:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = np.stack(df["gate"].to_numpy())
    per_user = pd.DataFrame(gates).groupby(df["user_id"].to_numpy()).mean().to_numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.boxplot(per_user, showfliers=False)
    left.set(xlabel="meta-LoRA k", ylabel="gate weight alpha_k (per-user mean)",
             title=f"Gate weights over {len(per_user)} users")
    right.hist(per_user.max(axis=1), bins=30, color="tab:orange")
    right.axvline(1 / gates.shape[1], ls="--", c="grey", label="uniform 1/N_m")
    right.set(xlabel="largest gate weight of the user", ylabel="users", title="How personalized each mix is")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(run: RunDir, notes: list[str] | None = None) -> dict:
    scores = collect_scores(run)
    if not scores:
        raise FileNotFoundError(f"no scored models under {run.root / 'scores'}; run `reclora score` first")
    payload = {"models": {n: {k: scores[n][k] for k in ("auc", "logloss", "n")} for n in scores}}
    write_json_atomic(run.root / "metrics.json", payload)
    parts = ["# RecLoRA run report", "", comparison_table(scores), ""]
    parts += ["Rel.Impr: relative AUC improvement of RecLoRA over the row, as in the paper's Table 2.", ""]
    if plot_roc(run, list(scores), run.root / "roc.png"):
        parts += ["![ROC curves](roc.png)", ""]
    if plot_gates(run, OURS, run.root / "gates.png"):
        parts += ["![Gate weights](gates.png)", ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    tmp = run.report.with_name(".report.md.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(run.report)
    log.info("wrote %s", run.report)
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the run directory")


def main(args: argparse.Namespace) -> int:
    payload = write_report(RunDir(args.out))
    print(json.dumps(payload, indent=2))
    return 0

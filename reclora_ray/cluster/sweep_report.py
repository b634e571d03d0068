"""A sweep's results for people: the table (sweep.md), the spread over seeds, the plot (sweep.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def markdown_table(rows: list[dict], grid_keys: list[str]) -> str:
    """One row per experiment: its grid values, status, seconds and every metric any row has."""
    metric_keys = sorted({k for r in rows for k in r["metrics"]})
    header = ["experiment", *grid_keys, *metric_keys, "status", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["name"], *(format_value(r["overrides"].get(k, "")) for k in grid_keys)]
        cells += [format_value(r["metrics"].get(k, "")) for k in metric_keys]
        cells += [r["status"] if not r["error"] else f"{r['status']}: {r['error']}", f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


SEED_KEY = "run.seed"


def seed_summary(rows: list[dict]) -> str:
    """Where experiments differ only in `run.seed`: each AUC-like metric's mean, standard deviation
    and range over the seeds, per setting (the spread a chosen setting is reported with)."""
    import numpy as np

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if SEED_KEY in r["overrides"] and r["status"] == "succeeded":
            setting = {k: v for k, v in r["overrides"].items() if k != SEED_KEY}
            groups.setdefault(json.dumps(setting, sort_keys=True, default=str), []).append(r)
    lines = []
    for group in groups.values():
        if len(group) < 2:
            continue
        name = ",".join(p for p in group[0]["name"].split(",") if not p.startswith("seed=")) or "base"
        seeds = ", ".join(str(r["overrides"][SEED_KEY]) for r in group)
        shared = set.intersection(*(set(r["metrics"]) for r in group))
        for key in sorted(k for k in shared if k.endswith("auc") and not k.startswith("own_samples.")):
            values = np.array([r["metrics"][key] for r in group], dtype=float)
            lines.append(
                f"| {name} | {key} | {values.mean():.4f} | {values.std(ddof=1):.4f} | "
                f"{values.min():.4f} | {values.max():.4f} | {seeds} |"
            )
    if not lines:
        return ""
    header = [
        "",
        "Over seeds:",
        "",
        "| setting | metric | mean | sd | min | max | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + lines) + "\n"


def plot_sweep(rows: list[dict], grid_keys: list[str], path: Path) -> str | None:
    """sweep.png: each tuned variant's validation AUC (what a sweep selects on, `valid.<v>.auc`;
    the test AUCs where no experiment has one) against each numeric grid axis, one panel per axis,
    else one bar per experiment and variant. Returns what it shows ("Validation AUC", "Test AUC"),
    or None (nothing drawn) when no experiment has a finite AUC."""

    def aucs(keep) -> dict[str, dict[str, float]]:
        found = {}
        for r in rows:
            if r["status"] == "succeeded":
                got = {k: v for k, v in r["metrics"].items() if keep(k) and isinstance(v, float) and math.isfinite(v)}
                if got:
                    found[r["name"]] = got
        return found

    title, found = "Validation AUC", aucs(lambda k: k.startswith("valid.") and k.endswith(".auc"))
    if not found:
        title, found = "Test AUC", aucs(lambda k: k == "auc" or (k.count(".") == 1 and k.endswith(".auc")))
    if not found:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["name"] in found]
    keys = sorted({k for got in found.values() for k in got})
    label = {k: k.removeprefix("valid.").removesuffix("auc").removesuffix(".") or "AUC" for k in keys}
    numeric = [k for k in grid_keys if all(isinstance(r["overrides"].get(k), (int, float)) for r in done)]
    values = [v for got in found.values() for v in got.values()]
    low, high = min(values), max(values)
    span = max(high - low, 0.01)
    if not numeric:  # one bar per experiment and variant, in the spec's order, top to bottom
        fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(done) * len(keys) + 2.5))
        height = 0.8 / len(keys)
        for j, key in enumerate(keys):
            where = [i + j * height for i, r in enumerate(done) if key in found[r["name"]]]
            bars = ax.barh(
                where, [found[r["name"]][key] for r in done if key in found[r["name"]]], height, label=label[key]
            )
            ax.bar_label(bars, fmt="%.4f", fontsize=7, padding=2)
        ax.set_yticks([i + (len(keys) - 1) * height / 2 for i in range(len(done))], [r["name"] for r in done])
        ax.invert_yaxis()
        ax.set(xlim=(low - span, high + span / 2), xlabel="AUC", title=title)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.grid(alpha=0.3)
    else:
        fig, axes = plt.subplots(1, len(numeric), figsize=(5.5 * len(numeric), 4), squeeze=False)
        for ax, axis in zip(axes[0], numeric):
            for key in keys:
                points = sorted((r["overrides"][axis], found[r["name"]][key]) for r in done if key in found[r["name"]])
                # Joined only when this axis is the grid's one: else points differ in another axis too.
                ax.plot(*zip(*points), "o-" if len(numeric) == 1 else "o", label=label[key])
            xs = [r["overrides"][axis] for r in done]
            if min(xs) > 0 and max(xs) / min(xs) > 8:
                ax.set_xscale("log", base=2)
            ax.set(xlabel=axis, ylabel="AUC", title=title)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return title


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ",".join(map(format_value, value)) + "]"
    return str(value)

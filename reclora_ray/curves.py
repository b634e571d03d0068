"""Training curves: per-step loss and learning rate, per-epoch validation metrics.

Rank 0 of a training run (the CRM's, each tuned variant's) appends them as JSON lines to
`curves.jsonl` beside its Ray Train storage, and the stage copies that file into its output
(OUT/crm/<model>/curves.jsonl, OUT/adapter/<variant>/curves.jsonl). The same values go to the
configured tracker (`tracking`):

    tensorboard  OUT/tracking/<run>/ event files (tensorboardX, Ray's own TensorBoard writer);
                 look with `tensorboard --logdir OUT/tracking`
    mlflow       a local file store OUT/mlruns through Ray's `setup_mlflow` (MLFLOW_TRACKING_URI
                 overrides it); look with `mlflow ui --backend-store-uri OUT/mlruns`
    wandb        Weights & Biases through Ray's `setup_wandb` (project "reclora"; WANDB_MODE=offline
                 keeps it under OUT/tracking/wandb)
    none         only curves.jsonl

A restarted run appends to the same file: its records carry the attempt, and steps keep counting.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

CURVES_FILE = "curves.jsonl"
TRACKERS = ("none", "tensorboard", "mlflow", "wandb")
_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


def curves_config(tracking: str, storage: Path, out: Path, run_name: str) -> dict:
    """What a training loop needs to open its Curves (picklable, for the loop config); fails on
    the driver, before any worker starts, when the tracker's package is missing."""
    if tracking not in TRACKERS:
        raise ValueError(f"tracking: {tracking!r} is not one of {', '.join(TRACKERS)}")
    if tracking != "none":
        import importlib.util

        if importlib.util.find_spec(_PACKAGES[tracking]) is None:
            raise ValueError(
                f"tracking: {tracking} needs the {_PACKAGES[tracking]} package "
                f"(pip install {_PACKAGES[tracking]}), or set tracking=none"
            )
    return {
        "path": str(Path(storage).resolve() / CURVES_FILE),
        "tracking": tracking,
        "out": str(Path(out).resolve()),
        "run_name": run_name,
    }


def keep_curves(storage: Path, output: Path) -> None:
    """Copy a finished run's curves into the stage output being written."""
    source = Path(storage) / CURVES_FILE
    if source.is_file():
        shutil.copyfile(source, Path(output) / CURVES_FILE)


class Curves:
    """Rank 0's curve writer; on the other ranks every call does nothing."""

    def __init__(self, config: dict, rank: int, attempt: int = 0):
        self.active = rank == 0
        self.attempt = attempt
        self.steps = 0
        if not self.active:
            return
        self.path = Path(config["path"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():  # a restart: keep counting after the last recorded step
            steps = [r["step"] for r in read_curves(self.path) if r["kind"] == "step"]
            self.steps = max(steps, default=-1) + 1
        self._file = self.path.open("a", buffering=1)
        self._tracker = _open_tracker(config)

    def step(self, **values: float) -> None:
        """One training step's scalars (loss, lr, ...)."""
        if self.active:
            self._write("step", self.steps, {"step": self.steps}, values, "train")
            self.steps += 1

    def epoch(self, epoch: int, **values: float) -> None:
        """One epoch's validation scalars (auc, logloss, ...)."""
        if self.active:
            self._write("epoch", self.steps, {"epoch": epoch, "step": self.steps}, values, "valid")
            self._tracker.flush()

    def close(self) -> None:
        if self.active:
            self._file.close()
            self._tracker.close()

    def _write(self, kind: str, step: int, keys: dict, values: dict, prefix: str) -> None:
        values = {k: float(v) for k, v in values.items()}
        record = {"kind": kind, **keys, "attempt": self.attempt, **values}
        self._file.write(json.dumps(record) + "\n")
        self._tracker.log({f"{prefix}/{k}": v for k, v in values.items() if math.isfinite(v)}, step)


def read_curves(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class _NoTracker:
    def __init__(self, config: dict):
        pass

    def log(self, values: dict, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _TensorBoard(_NoTracker):
    def __init__(self, config: dict):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(Path(config["out"]) / "tracking" / config["run_name"]))

    def log(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow(_NoTracker):
    def __init__(self, config: dict):
        from ray.air.integrations.mlflow import setup_mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(config["out"]) / "mlruns").as_uri()
        self.mlflow = setup_mlflow(
            {"run": config["run_name"]},
            tracking_uri=uri,
            experiment_name="reclora",
            run_name=config["run_name"],
            create_experiment_if_not_exists=True,
        )

    def log(self, values: dict, step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _WandB(_NoTracker):
    def __init__(self, config: dict):
        from ray.air.integrations.wandb import setup_wandb

        directory = Path(config["out"]) / "tracking"
        directory.mkdir(parents=True, exist_ok=True)
        self.run = setup_wandb(
            {"run": config["run_name"]}, project="reclora", name=config["run_name"], dir=str(directory)
        )

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _open_tracker(config: dict) -> _NoTracker:
    return {"none": _NoTracker, "tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}[config["tracking"]](
        config
    )


def plot_curves(root: Path, path: Path) -> bool:
    """Training loss per step and validation AUC/LogLoss per epoch of every run in OUT with
    curves (the CRMs and the tuned variants), one line each; False when there are none."""
    runs = {
        f"{kind}/{p.parent.name}": read_curves(p)
        for kind in ("crm", "adapter")
        for p in sorted((Path(root) / kind).glob(f"*/{CURVES_FILE}"))
    }
    runs = {name: records for name, records in runs.items() if records}
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, auc_ax, ll_ax) = plt.subplots(1, 3, figsize=(15, 4))
    for name, records in runs.items():
        steps = [r for r in records if r["kind"] == "step" and "loss" in r]
        if steps:
            loss = [r["loss"] for r in steps]
            window = max(1, len(loss) // 50)  # a running mean, so a noisy per-step loss stays readable
            smooth = [
                sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1])
                for i in range(len(loss))
            ]
            loss_ax.plot([r["step"] for r in steps], smooth, label=name, lw=1.2)
        epochs = [r for r in records if r["kind"] == "epoch"]
        for ax, key in ((auc_ax, "auc"), (ll_ax, "logloss")):
            points = [(r["epoch"], r[key]) for r in epochs if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=name, lw=1.2)
    loss_ax.set(xlabel="step", ylabel="training loss (running mean)", title="Training loss")
    auc_ax.set(xlabel="epoch", ylabel="AUC", title="Validation AUC")
    ll_ax.set(xlabel="epoch", ylabel="LogLoss", title="Validation LogLoss")
    for ax in (loss_ax, auc_ax, ll_ax):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

"""`reclora run`: every stage of a task in the order of the stage table (reclora_ray/stages.py).

CTR (the paper's Table 2): prepare -> embed -> retrieve -> pretrain-crm -> tune -> score -> report.
next-item (iLoRA's ranking task): the same upstream stages (shared with the CTR run, skipped when
done), then its own tuning, scoring and report under OUT/next-item/.

Every stage checks its own output's fingerprint, so a re-run skips finished stages and resumes
where the last run stopped; `--overwrite` redoes stages whose config changed.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from reclora_ray.config import Config
from reclora_ray.console import stage_line
from reclora_ray.rundir import RunDir
from reclora_ray.runtime import add_common_arguments, config_from_args, save_resolved_config
from reclora_ray.stages import STAGES, TASKS, Stage, execute, task_stages

log = logging.getLogger(__name__)


def run_task(
    cfg: Config, out: str | Path | RunDir, task: str = "ctr", overwrite: bool = False, stages: list[Stage] | None = None
):
    """Every stage instance of `task` in table order (or of `stages`, a part of it); returns the
    last one's result (the report's)."""
    run = RunDir.of(out)
    run.root.mkdir(parents=True, exist_ok=True)
    run.upgrade()
    save_resolved_config(cfg, run.root)
    timings: dict[str, float] = {}
    result = None
    for stage in task_stages(task) if stages is None else stages:
        for key in stage.instances(cfg, task):
            title = stage.title(key) if stage.title else stage.name
            start = time.perf_counter()
            with stage_line(log, title):
                extra = {"timings": timings} if stage.takes_timings else {}
                result = execute(stage, cfg, run, key, overwrite, **extra)
            timings[title] = round(time.perf_counter() - start, 1)
    return result


def run_pipeline(cfg: Config, out: str, overwrite: bool = False) -> dict:
    """The CTR run; returns OUT/metrics.json: {"models": {name: {"auc", "logloss", ...}}}."""
    return run_task(cfg, out, "ctr", overwrite)


def run_tuning(cfg: Config, out: str) -> dict:
    """The CTR run up to tuning, nothing scored on test: a sweep's experiment when it selects
    settings (`experiment: reclora_ray.pipeline:run_tuning`). Returns {"valid": {variant: {"auc",
    "logloss", ...}}}, each tuned variant's validation figures at the epoch tuning kept."""
    from reclora_ray.report import validation_metrics

    run = RunDir.of(out)
    ctr = task_stages("ctr")
    run_task(cfg, run, "ctr", stages=ctr[: ctr.index(STAGES["tune"]) + 1])
    found = validation_metrics(run)
    return {"valid": {name: found[name] for name in cfg.tune.variants if name in found}}


def run_next_item(cfg: Config, out: str, overwrite: bool = False) -> dict:
    """The next-item run; returns OUT/next-item/metrics.json."""
    return run_task(cfg, out, "next-item", overwrite)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="ctr",
        help="ctr: the paper's Table 2; next-item: ranking 20 candidates (OUT/next-item/report.md)",
    )


def headline(report: Path) -> str:
    """A report's opening (its title, the comparison table and what the table means), up to its
    first plot or section: what `reclora run` prints at the end, the rest being in the file."""
    lines = report.read_text().splitlines()
    end = next((i for i, line in enumerate(lines[1:], 1) if line.startswith(("![", "## "))), len(lines))
    return "\n".join(lines[:end]).rstrip()


def main(args: argparse.Namespace) -> int:
    run_task(config_from_args(args), args.out, args.task, overwrite=args.overwrite)
    run = RunDir.of(args.out)
    report = run.next_item / "report.md" if args.task == "next-item" else run.report
    if report.is_file():
        print(f"{headline(report)}\n\nThe whole report, with its plots: {report}")
    return 0

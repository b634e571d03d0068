"""Run a grid of experiments as concurrent Ray tasks and merge their results into one table.

A sweep = a base config (+ `--set` overrides), optional named variants (override sets, e.g. the
paper's Table 3 ablations) and a grid (every combination of the listed values, e.g.
`lora.n_meta=1,2,4,8,16`). Every experiment's config is built and validated before anything
runs, then each experiment is one Ray task calling the experiment function

    experiment(cfg: Config, out: str) -> dict   # its metrics, possibly nested

with `out = OUT/<experiment name>`. The function is named by an import path; the default,
`reclora_ray.pipeline:run_pipeline`, runs every stage and returns
`{"models": {name: {"auc": ..., "logloss": ...}}}`, which becomes the columns `name.auc`, ...

Shared upstream stages: experiments whose configs agree on every section a stage output depends
on (SHARED_STAGES) compute it once. The first experiment of each distinct set of upstream
configs (a "leader") runs first; every other experiment then starts with the leaders' finished
data, embeddings, retrieval and CRM outputs that fit its config already in its run directory
(symlinked on a filesystem, copied at a URI), so its pipeline skips those stages. The N_m
sweep thus prepares, embeds, retrieves and pretrains once and tunes five times.
`share_upstream: false` runs every experiment at once, each computing everything.

Resources: each task asks for `resources` (default 1 CPU: an experiment that drives the
pipeline, whose stages then request their own workers' CPUs and GPUs from the config; an
experiment that trains in its own process asks for its GPU here). Pending requests are the
demand an autoscaling cluster grows for; on one machine Ray queues them. `max_concurrent`
bounds how many experiments run at once.

Results: OUT/<name>/experiment.json per experiment (a re-run skips experiments finished with the
same config), and OUT/sweep.json + OUT/sweep.md for the whole grid; failed experiments are rows
with their error, not a crash of the sweep. OUT may be a path or any pyarrow URI (experiments
then run in a local scratch directory that is uploaded when they finish).
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from reclora_ray import storage
from reclora_ray.config import Config, ConfigError, load_config
from reclora_ray.rundir import MARKER

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "reclora_ray.pipeline:run_pipeline"

# Upstream stage outputs (run-directory parts) one experiment may take from another, each with
# the config sections it depends on: a superset of what the stage's own fingerprint hashes, so
# an output is shared only where the stage would have skipped it anyway. "crm" stands for every
# finished OUT/crm/<name>.
SHARED_STAGES: dict[str, tuple[str, ...]] = {
    "data": ("run", "data"),
    "embeddings": ("run", "data", "embed", "llm"),
    "data/retrieval": ("run", "data", "embed", "llm", "retrieve"),
    "crm": ("run", "data", "embed", "llm", "retrieve", "crm"),
}


@dataclass
class SweepSpec:
    config: str = "quickstart"
    overrides: list[str] = field(default_factory=list)  # applied to every experiment
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})
    grid: dict[str, list[Any]] = field(default_factory=dict)
    experiment: str = DEFAULT_EXPERIMENT
    resources: dict[str, float] = field(default_factory=lambda: {"num_cpus": 1})
    max_concurrent: int | None = None
    share_upstream: bool = True  # leaders first, the rest reuse their upstream stage outputs

    @classmethod
    def from_yaml(cls, path: str) -> "SweepSpec":
        raw = yaml.safe_load(storage.read_text(path)) or {}
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}; known: {sorted(known)}")
        if "set" in raw:
            raise ConfigError(f"{path}: use 'overrides', not 'set'")
        return cls(**raw)


@dataclass
class Experiment:
    name: str
    overrides: dict[str, Any]  # variant + grid point, on top of the spec's overrides
    cfg: Config

    @property
    def dirname(self) -> str:
        """The experiment's run directory under the sweep's: its name, safe as a path part."""
        return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", self.name)

    def stage_key(self, stage: str) -> str:
        return self.cfg.section_hash(*SHARED_STAGES[stage])

    @property
    def upstream_key(self) -> tuple[str, ...]:
        return tuple(self.stage_key(stage) for stage in SHARED_STAGES)


def parse_grid_arg(item: str) -> tuple[str, list[Any]]:
    """`lora.n_meta=1,2,4` or `lora.target_modules=[[q_proj],[q_proj,v_proj]]` -> key, values."""
    key, sep, values = item.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. lora.n_meta=1,2,4,8,16")
    values = values.strip()
    parsed = yaml.safe_load(values if values.startswith("[") else f"[{values}]")
    return key.strip(), parsed


def expand(spec: SweepSpec) -> list[Experiment]:
    """Every (variant, grid point) as a validated config; bad keys fail here, before any task."""
    keys = list(spec.grid)
    experiments = []
    for variant, variant_overrides in spec.variants.items():
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            point = dict(zip(keys, values))
            overrides = {**(variant_overrides or {}), **point}
            parts = [variant] if variant else []
            parts += [f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in point.items()]
            name = ",".join(parts) or "base"
            try:
                cfg = load_config(spec.config, spec.overrides + [f"{k}={_yaml(v)}" for k, v in overrides.items()])
            except ConfigError as exc:
                raise ConfigError(f"sweep experiment {name}: {exc}") from exc
            experiments.append(Experiment(name, overrides, cfg))
    dirs = [e.dirname for e in experiments]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"sweep experiments with the same name: {sorted(d for d in dirs if dirs.count(d) > 1)}")
    return experiments


def resolve(import_path: str) -> Callable[[Config, str], dict]:
    module, sep, attr = import_path.partition(":")
    if not sep:
        raise ConfigError(f"experiment {import_path!r}: expected 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"experiment {import_path!r} cannot be loaded: {exc}") from exc


def run_sweep(spec: SweepSpec, out: str) -> list[dict]:
    """Run every experiment not already finished under `out`; write sweep.json and sweep.md."""
    experiments = expand(spec)
    resolve(spec.experiment)  # fail before scheduling anything if the function is not there
    rows: dict[str, dict] = {}
    todo = []
    for exp in experiments:
        done = _finished(exp, out)
        if done:
            log.info("%s: finished earlier, reusing its result", exp.name)
            rows[exp.name] = done
        else:
            todo.append(exp)

    if spec.share_upstream:
        leaders = {}
        held = {e.upstream_key for e in experiments if e.name in rows}
        for exp in todo:
            if exp.upstream_key not in held:
                leaders.setdefault(exp.upstream_key, exp)
        waves = [list(leaders.values()), [e for e in todo if e not in leaders.values()]]
    else:
        waves = [todo]
    log.info("sweep: %d experiments to run (%d reused) in %s, up to %s at once, each asking %s",
             len(todo), len(rows), " then ".join(f"{len(w)}" for w in waves if w),
             spec.max_concurrent or "all", spec.resources)
    for wave in waves:
        _run_wave(spec, wave, out, rows, experiments)

    ordered = [rows[e.name] for e in experiments]
    storage.write_text(storage.join(out, "sweep.json"), json.dumps(ordered, indent=2))
    storage.write_text(storage.join(out, "sweep.md"), markdown_table(ordered, list(spec.grid)))
    return ordered


def _run_wave(spec: SweepSpec, wave: list[Experiment], out: str, rows: dict[str, dict],
              experiments: list[Experiment]) -> None:
    """Run `wave` as Ray tasks, at most spec.max_concurrent at once; results go into `rows`.
    Each experiment takes the upstream outputs of every experiment finished when it starts."""
    import ray

    task = ray.remote(_run_one)
    todo = list(wave)
    limit = spec.max_concurrent or len(todo) or 1
    pending: dict[Any, Experiment] = {}
    while todo or pending:
        while todo and len(pending) < limit:
            exp = todo.pop(0)
            donors = _donors(exp, experiments, rows, out) if spec.share_upstream else {}
            ref = task.options(**spec.resources, name=f"sweep:{exp.name}").remote(
                spec.experiment, exp.cfg, storage.join(out, exp.dirname), exp.name, exp.overrides, donors)
            pending[ref] = exp
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        exp = pending.pop(ref)
        rows[exp.name] = ray.get(ref)
        log.info("sweep: %s %s (%d/%d)", exp.name, rows[exp.name]["status"], len(rows), len(experiments))


def _donors(exp: Experiment, experiments: list[Experiment], rows: dict[str, dict], out: str) -> dict[str, str]:
    """{stage: run directory of a finished experiment whose output of that stage fits `exp`}."""
    donors = {}
    for stage in SHARED_STAGES:
        for other in experiments:
            if (other is not exp and rows.get(other.name, {}).get("status") == "succeeded"
                    and other.stage_key(stage) == exp.stage_key(stage)):
                donors[stage] = storage.join(out, other.dirname)
                break
    return donors


def _run_one(experiment: str, cfg: Config, out: str, name: str, overrides: dict, donors: dict[str, str]) -> dict:
    """One experiment inside its Ray task; an exception becomes a 'failed' row."""
    import ray

    started = time.time()
    row = {"name": name, "overrides": overrides, "fingerprint": _fingerprint(cfg),
           "node_id": ray.get_runtime_context().get_node_id(), "started_at": started,
           "shared": {stage: donor.rsplit("/", 1)[-1] for stage, donor in donors.items()}}
    try:
        with storage.local_run_dir(out, inputs=[""]) as run_dir:
            for stage, donor in donors.items():
                share_stage(donor, run_dir, stage)
            metrics = flatten_metrics(resolve(experiment)(cfg, str(run_dir)))
        row.update(status="succeeded", metrics=metrics, error=None)
    except Exception as exc:  # noqa: BLE001 - one failed grid point must not sink the sweep
        logging.getLogger(__name__).exception("experiment %s failed", name)
        row.update(status="failed", metrics={}, error=f"{type(exc).__name__}: {exc}")
    row["seconds"] = round(time.time() - started, 3)
    if row["status"] == "succeeded":
        storage.write_text(storage.join(out, "experiment.json"), json.dumps(row, indent=2))
    return row


def share_stage(donor: str, run_dir: Path, stage: str) -> None:
    """Put the donor run's finished `stage` output(s) into `run_dir`, unless it has its own.

    A local donor is symlinked (relative links, so a sweep directory can move); `data` becomes a
    directory of links to the donor's files, so a retrieval output of another config can be
    written beside them without touching the donor. A URI donor is copied.
    """
    outputs = ([f"crm/{name}" for name in _finished_children(storage.join(donor, "crm"))]
               if stage == "crm" else [stage])
    for part in outputs:
        source, target = storage.join(donor, part), run_dir / part
        if target.exists() or target.is_symlink() or not storage.exists(storage.join(source, MARKER)):
            continue
        if storage.is_uri(source):
            storage.download(source, target)
            if stage == "data":  # its retrieval is a stage of its own, shared only if it fits
                shutil.rmtree(target / "retrieval", ignore_errors=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if stage == "data":
            target.mkdir()
            for entry in Path(source).iterdir():
                if entry.name != "retrieval" and not entry.name.startswith("."):
                    (target / entry.name).symlink_to(os.path.relpath(entry, target))
        else:
            target.symlink_to(os.path.relpath(source, target.parent), target_is_directory=True)


def _finished_children(location: str) -> list[str]:
    return sorted(rel for rel in storage.finished_outputs(location) if rel and "/" not in rel)


def flatten_metrics(result: dict) -> dict[str, Any]:
    """Nested metrics -> one level: {"models": {"reclora": {"auc": x}}} -> {"reclora.auc": x}."""
    flat = {}
    for key, value in result.items():
        if isinstance(value, dict):
            inner = flatten_metrics(value)
            prefix = "" if key == "models" else f"{key}."
            flat.update({f"{prefix}{k}": v for k, v in inner.items()})
        else:
            flat[key] = value
    return flat


def _finished(exp: Experiment, out: str) -> dict | None:
    location = storage.join(out, exp.dirname, "experiment.json")
    if not storage.exists(location):
        return None
    row = json.loads(storage.read_text(location))
    return row if row.get("fingerprint") == _fingerprint(exp.cfg) else None


def _fingerprint(cfg: Config) -> str:
    return cfg.section_hash(*asdict(cfg).keys())


def markdown_table(rows: list[dict], grid_keys: list[str]) -> str:
    """One row per experiment: its grid values, status, seconds and every metric any row has."""
    metric_keys = sorted({k for r in rows for k in r["metrics"]})
    header = ["experiment", *grid_keys, *metric_keys, "status", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["name"], *(_fmt(r["overrides"].get(k, "")) for k in grid_keys)]
        cells += [_fmt(r["metrics"].get(k, "")) for k in metric_keys]
        cells += [r["status"] if not r["error"] else f"{r['status']}: {r['error']}", f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ",".join(map(_fmt, value)) + "]"
    return str(value)


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()

"""Run a grid of experiments as concurrent Ray tasks and merge their results into one table.

A sweep = a base config (+ `--set` overrides), optional named variants (override sets, e.g. the
paper's Table 3 ablations) and a grid (every combination of the listed values, e.g.
`lora.n_meta=1,2,4,8,16`). Every experiment's config is built and validated before anything
runs, then each experiment is one Ray task calling the experiment function

    run_experiment(cfg: Config, out: str) -> dict[str, number | str]   # its metrics

with `out = OUT/<experiment name>` (OUT may be any pyarrow URI). The function is named by an
import path (default `reclora_ray.pipeline:run_experiment`, which runs every stage).

Resources: each task asks for `resources` (default 1 CPU: an experiment that drives the
pipeline, whose stages then request their own workers' CPUs and GPUs from the config; an
experiment that trains in its own process asks for its GPU here). Pending requests are the
demand an autoscaling cluster grows for; on one machine Ray queues them. `max_concurrent`
bounds how many experiments run at once.

Results: OUT/<name>/experiment.json per experiment (a re-run skips experiments finished with the
same config), and OUT/sweep.json + OUT/sweep.md for the whole grid; failed experiments are rows
with their error, not a crash of the sweep.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import yaml

from reclora_ray import storage
from reclora_ray.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "reclora_ray.pipeline:run_experiment"


@dataclass
class SweepSpec:
    config: str = "quickstart"
    overrides: list[str] = field(default_factory=list)  # applied to every experiment
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})
    grid: dict[str, list[Any]] = field(default_factory=dict)
    experiment: str = DEFAULT_EXPERIMENT
    resources: dict[str, float] = field(default_factory=lambda: {"num_cpus": 1})
    max_concurrent: int | None = None

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
    import ray

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

    task = ray.remote(_run_one)
    limit = spec.max_concurrent or len(todo) or 1
    pending: dict[Any, Experiment] = {}
    log.info("sweep: %d experiments to run (%d reused), up to %d at once, each asking %s",
             len(todo), len(rows), limit, spec.resources)
    while todo or pending:
        while todo and len(pending) < limit:
            exp = todo.pop(0)
            ref = task.options(**spec.resources, name=f"sweep:{exp.name}").remote(
                spec.experiment, exp.cfg, storage.join(out, exp.dirname), exp.name, exp.overrides)
            pending[ref] = exp
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        exp = pending.pop(ref)
        rows[exp.name] = ray.get(ref)
        log.info("sweep: %s %s (%d/%d)", exp.name, rows[exp.name]["status"], len(rows), len(experiments))

    ordered = [rows[e.name] for e in experiments]
    storage.write_text(storage.join(out, "sweep.json"), json.dumps(ordered, indent=2))
    storage.write_text(storage.join(out, "sweep.md"), markdown_table(ordered, list(spec.grid)))
    return ordered


def _run_one(experiment: str, cfg: Config, out: str, name: str, overrides: dict) -> dict:
    """One experiment inside its Ray task; an exception becomes a 'failed' row."""
    import ray

    started = time.time()
    row = {"name": name, "overrides": overrides, "fingerprint": _fingerprint(cfg),
           "node_id": ray.get_runtime_context().get_node_id(), "started_at": started}
    try:
        metrics = resolve(experiment)(cfg, out)
        row.update(status="succeeded", metrics=dict(metrics), error=None)
    except Exception as exc:  # noqa: BLE001 - one failed grid point must not sink the sweep
        logging.getLogger(__name__).exception("experiment %s failed", name)
        row.update(status="failed", metrics={}, error=f"{type(exc).__name__}: {exc}")
    row["seconds"] = round(time.time() - started, 3)
    if row["status"] == "succeeded":
        storage.write_text(storage.join(out, "experiment.json"), json.dumps(row, indent=2))
    return row


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

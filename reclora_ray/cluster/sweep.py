"""Run a sweep of experiments as Ray Tune trials and merge their results into one table.

A sweep = a base config (+ `--set` overrides), optional named variants (override sets, e.g. the
paper's Table 3 ablations) and a search space: a grid (every combination of the listed values,
e.g. `lora.n_meta=1,2,4,8,16`) or a random search (`num_samples` points drawn with Tune's
samplers). Every experiment's config is built and validated before anything runs; each is then
one Tune trial calling the experiment function

    experiment(cfg: Config, out: str) -> dict   # its metrics, possibly nested

with `out = OUT/<experiment name>`. The function is named by an import path; the default,
`reclora_ray.pipeline:run_pipeline`, runs every stage and returns
`{"models": {name: {"auc": ..., "logloss": ...}}}`, which becomes the columns `name.auc`, ...

Shared upstream stages: experiments whose configs agree on everything a `shared` stage of the
stage table (reclora_ray/stages.py: prepare, embed, retrieve, pretrain-crm) depends on, its own
sections and its upstream stages' in turn (`stages.sweep_key`), compute it once: the first
experiment with each stage's key leads it, and the sweep runs in waves (one Tune experiment each)
so that every experiment starts after the leaders it takes those outputs from, with the outputs
already in its run directory (symlinked on a filesystem, copied at a URI); its pipeline skips them.
The N_m sweep thus prepares, embeds, retrieves and pretrains once and tunes five times.
`share_upstream: false` runs every experiment in one wave, each computing everything.

Resources: each trial runs its experiment as a Ray task asking `resources` (default 1 CPU: an
experiment that drives the pipeline, whose stages then request their own workers' CPUs and GPUs
from the config; an experiment that trains in its own process asks for its GPU here). Pending
experiments are the demand an autoscaling cluster grows for; on one machine they queue.
`max_concurrent` is Tune's max_concurrent_trials.

Results: OUT/<name>/experiment.json per experiment (a re-run skips experiments finished with the
same config), and OUT/sweep.json + OUT/sweep.md for the whole sweep; a failed trial is a row
with its error, not a crash of the sweep. A re-run after the driver died restores each wave's
Tune experiment (OUT/.tune/) with `Tuner.restore`. OUT may be a path or any pyarrow URI
(experiments then run in a local scratch directory that is uploaded when they finish).
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from reclora_ray import stages, storage
from reclora_ray.cluster.sweep_report import format_value, markdown_table, plot_sweep, seed_summary
from reclora_ray.config import Config, ConfigError, load_config
from reclora_ray.rundir import MARKER, RunDir, local_run_dir

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "reclora_ray.pipeline:run_pipeline"


def shared_stages() -> dict[str, stages.Stage]:
    """The stages experiments may take from one another: the `shared` entries of the stage table."""
    return {name: stage for name, stage in stages.STAGES.items() if stage.shared}


@dataclass
class SweepSpec:
    config: str = "quickstart"
    overrides: list[str] = field(default_factory=list)  # applied to every experiment
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})
    grid: dict[str, list[Any]] = field(default_factory=dict)
    experiment: str = DEFAULT_EXPERIMENT
    resources: dict[str, float] = field(default_factory=lambda: {"num_cpus": 1})
    max_concurrent: int | None = None  # Tune's max_concurrent_trials
    max_failures: int = 0  # Tune retries of a failed trial
    # grid: every combination of the grid's values; random: num_samples points drawn (seed) from
    # it, where an axis may also be a range, {uniform: [lo, hi]}, {loguniform: ...} or {randint: ...}
    search: str = "grid"
    num_samples: int | None = None
    seed: int = 0
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
        """What this experiment's instances of `stage` depend on (equal keys: the same outputs)."""
        keys = [stages.sweep_key(stage, self.cfg, key) for key in stages.STAGES[stage].instances(self.cfg, "ctr")]
        return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]

    @property
    def upstream_key(self) -> tuple[str, ...]:
        return tuple(self.stage_key(stage) for stage in shared_stages())


def parse_grid_arg(item: str) -> tuple[str, list[Any]]:
    """`lora.n_meta=1,2,4` or `lora.target_modules=[[q_proj],[q_proj,v_proj]]` -> key, values."""
    key, sep, values = item.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. lora.n_meta=1,2,4,8,16")
    values = values.strip()
    parsed = yaml.safe_load(values if values.startswith("[") else f"[{values}]")
    return key.strip(), parsed


def expand(spec: SweepSpec) -> list[Experiment]:
    """Every (variant, search point) as a validated config; bad keys fail here, before any trial."""
    experiments = []
    for variant, variant_overrides in spec.variants.items():
        for tag, point in search_points(spec):
            overrides = {**(variant_overrides or {}), **point}
            parts = ([variant] if variant else []) + ([tag] if tag else [])
            parts += [f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in point.items()]
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


RANGES = ("uniform", "loguniform", "randint")


def search_points(spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """(name tag, {key: value}) per point: the whole grid, or spec.num_samples points drawn
    with Ray Tune's sampling domains (tune.choice over a list, tune.uniform/... over a range)."""
    keys = list(spec.grid)
    if spec.search == "grid":
        for key, values in spec.grid.items():
            if not isinstance(values, list):
                raise ConfigError(f"sweep grid {key}: a list of values (ranges need search: random)")
        return [("", dict(zip(keys, values))) for values in itertools.product(*(spec.grid[k] for k in keys))]
    if spec.search != "random":
        raise ConfigError(f"sweep search {spec.search!r}: one of 'grid', 'random'")
    if not spec.num_samples or spec.num_samples < 1:
        raise ConfigError("sweep search 'random' needs num_samples >= 1")
    import numpy as np
    from ray import tune

    domains = {k: _domain(k, v, tune) for k, v in spec.grid.items()}
    rng = np.random.RandomState(spec.seed)
    return [
        (f"s{i}", {k: _plain(d.sample(random_state=rng)) for k, d in domains.items()}) for i in range(spec.num_samples)
    ]


def _domain(key: str, values: Any, tune):
    if isinstance(values, list) and values:
        return tune.choice(values)
    if isinstance(values, dict) and len(values) == 1 and next(iter(values)) in RANGES:
        kind, bounds = next(iter(values.items()))
        if isinstance(bounds, list) and len(bounds) == 2:
            return getattr(tune, kind)(*bounds)
    raise ConfigError(f"sweep grid {key}: a list of values or one of {{{'|'.join(RANGES)}: [lo, hi]}}, got {values!r}")


def _plain(value: Any) -> Any:
    """numpy scalars from Tune's samplers -> Python numbers, for configs and JSON."""
    return value.item() if hasattr(value, "item") else value


def resolve(import_path: str) -> Callable[[Config, str], dict]:
    module, sep, attr = import_path.partition(":")
    if not sep:
        raise ConfigError(f"experiment {import_path!r}: expected 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"experiment {import_path!r} cannot be loaded: {exc}") from exc


def run_sweep(spec: SweepSpec, out: str) -> list[dict]:
    """Run the sweep's experiments as Ray Tune trials under `out`; write sweep.json and sweep.md.

    Re-running the same command resumes: a wave's Tune experiment (OUT/.tune/wave<i>-<hash of its
    experiments>) is restored with `Tuner.restore`, so finished trials keep their results and
    errored or interrupted ones run again; an experiment finished with the same config under any
    earlier wave (its experiment.json) is reused without running."""
    experiments = expand(spec)
    resolve(spec.experiment)  # fail before scheduling anything if the function is not there
    if not storage.is_uri(out):
        out = str(Path(out).resolve())  # trials run elsewhere; their paths must not depend on a cwd
    rows: dict[str, dict] = {}
    waves = plan_waves(experiments) if spec.share_upstream else [experiments]
    log.info(
        "sweep: %d experiments as Ray Tune trials (%s search) in %s wave(s) of %s, up to %s at once, each asking %s",
        len(experiments),
        spec.search,
        len([w for w in waves if w]),
        "+".join(str(len(w)) for w in waves if w),
        spec.max_concurrent or "all",
        spec.resources,
    )
    for index, wave in enumerate(waves):
        if wave:
            _run_wave(spec, index, wave, out, rows, experiments)

    ordered = [rows[e.name] for e in experiments]
    storage.write_text(storage.join(out, "sweep.json"), json.dumps(ordered, indent=2))
    table = markdown_table(ordered, list(spec.grid)) + seed_summary(ordered)
    storage.write_text(storage.join(out, "sweep.md"), table)
    with tempfile.TemporaryDirectory() as tmp:
        title = plot_sweep(ordered, list(spec.grid), Path(tmp) / "sweep.png")
        if title:
            storage.write_bytes(storage.join(out, "sweep.png"), (Path(tmp) / "sweep.png").read_bytes())
            storage.write_text(storage.join(out, "sweep.md"), f"{table}\n![{title} of each experiment](sweep.png)\n")
    return ordered


def plan_waves(experiments: list[Experiment]) -> list[list[Experiment]]:
    """Experiments grouped so each runs after those it takes upstream stages from: per stage,
    the first experiment with the same stage key computes it (the "leader" of that stage)."""
    wave: dict[str, int] = {}
    for exp in experiments:
        leaders = [
            next(o for o in experiments if o.stage_key(stage) == exp.stage_key(stage)) for stage in shared_stages()
        ]
        wave[exp.name] = 1 + max((wave[o.name] for o in leaders if o is not exp), default=-1)
    return [[e for e in experiments if wave[e.name] == i] for i in range(max(wave.values(), default=-1) + 1)]


@dataclass
class _Plan:
    """What one trial runs: everything but the Tune config, which only names the experiment."""

    experiment: str
    cfg: Config
    out: str
    overrides: dict
    donors: dict[str, str]
    resources: dict[str, float]
    finished: dict | None  # its row, when finished earlier with the same config


def _run_wave(
    spec: SweepSpec, index: int, wave: list[Experiment], out: str, rows: dict[str, dict], experiments: list[Experiment]
) -> None:
    """One Tune experiment over `wave`; rows go into `rows`. Each experiment takes the upstream
    outputs of the experiments finished in earlier waves."""
    from ray import tune

    plan = {
        e.name: _Plan(
            spec.experiment,
            e.cfg,
            storage.join(out, e.dirname),
            e.overrides,
            _donors(e, experiments, rows, out) if spec.share_upstream else {},
            spec.resources,
            _finished(e, out, spec.experiment),
        )
        for e in wave
    }
    trainable = tune.with_resources(tune.with_parameters(_trial, plan=plan), _placement())
    digest = hashlib.sha256(
        json.dumps([[e.name, _fingerprint(e.cfg, spec.experiment)] for e in wave]).encode()
    ).hexdigest()[:12]
    location = storage.join(out, ".tune", f"wave{index}-{digest}")
    if storage.exists(location) and tune.Tuner.can_restore(location):
        log.info("sweep: resuming the Tune experiment %s", location)
        tuner = tune.Tuner.restore(location, trainable, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"experiment": tune.grid_search([e.name for e in wave])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=spec.max_concurrent,
                trial_name_creator=lambda trial: trial.config["experiment"],
                trial_dirname_creator=lambda trial: f"{trial.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=location.rsplit("/", 1)[-1],
                storage_path=storage.join(out, ".tune"),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                verbose=0,
                callbacks=[_trial_log()],
            ),
        )
    # Tune lists its experiment folder relative to the working directory at the end of fit; under
    # a Ray job that directory is the job's unpacked package, which the node may clean up meanwhile.
    os.chdir(Path(tempfile.gettempdir()))
    for result in tuner.fit():
        name = result.config["experiment"]
        row = json.loads(result.metrics["row"]) if result.metrics and "row" in result.metrics else None
        if row is None:  # the trial died before reporting (a crashed worker, a lost node)
            row = {
                "name": name,
                "overrides": plan[name].overrides,
                "fingerprint": _fingerprint(plan[name].cfg, spec.experiment),
                "shared": {},
                "status": "failed",
                "metrics": {},
                "error": _error_text(result.error),
                "seconds": 0.0,
            }
        rows[name] = row


def _placement():
    """The trial actor's own reservation: a token byte of memory (Tune needs a non-empty bundle),
    so a trial only waits and leaves the cluster's CPUs and GPUs to its experiment's task."""
    from ray import tune

    return tune.PlacementGroupFactory([{"memory": 1}])


def _trial(config: dict, plan: dict[str, _Plan]) -> None:
    """A Tune trial: its experiment as a Ray task asking the sweep's `resources` (what an
    autoscaler sees pending), outside the trial's placement group. Inside one, a task blocked on
    its stages would keep the bundle's CPUs from the stages' own Ray Train workers and Ray Data
    tasks; outside, Ray lends a blocked task's CPUs to them. A failed experiment reports its
    row, then fails the trial."""
    import ray
    from ray import tune

    name = config["experiment"]
    p = plan[name]
    row = p.finished
    if row is None:
        task = ray.remote(_run_one).options(**p.resources, scheduling_strategy="DEFAULT", name=f"sweep:{name}")
        row = ray.get(task.remote(p.experiment, p.cfg, p.out, name, p.overrides, p.donors))
    tune.report({"status": row["status"], "row": json.dumps(row)})
    if row["status"] != "succeeded":
        raise ExperimentFailed(f"{name}: {row['error']}")


class ExperimentFailed(RuntimeError):
    """A sweep experiment raised; its row (with the error) was reported first."""


def _error_text(error: BaseException | None) -> str:
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}" if cause is not None else "no result"


def _trial_log():
    """A Tune callback: one console line per trial start and end instead of Tune's status table."""
    from ray.tune import Callback

    class TrialLog(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            log.info("sweep: %s started", trial.config["experiment"])

        def on_trial_complete(self, iteration, trials, trial, **info):
            log.info("sweep: %s succeeded", trial.config["experiment"])

        def on_trial_error(self, iteration, trials, trial, **info):
            log.info("sweep: %s failed", trial.config["experiment"])

    return TrialLog()


def _donors(exp: Experiment, experiments: list[Experiment], rows: dict[str, dict], out: str) -> dict[str, str]:
    """{stage: run directory of a finished experiment whose output of that stage fits `exp`}."""
    donors = {}
    for stage in shared_stages():
        for other in experiments:
            if (
                other is not exp
                and rows.get(other.name, {}).get("status") == "succeeded"
                and other.stage_key(stage) == exp.stage_key(stage)
            ):
                donors[stage] = storage.join(out, other.dirname)
                break
    return donors


def _run_one(experiment: str, cfg: Config, out: str, name: str, overrides: dict, donors: dict[str, str]) -> dict:
    """One experiment inside its Ray task; an exception becomes a 'failed' row."""
    import ray

    started = time.time()
    row = {
        "name": name,
        "overrides": overrides,
        "fingerprint": _fingerprint(cfg, experiment),
        "node_id": ray.get_runtime_context().get_node_id(),
        "started_at": started,
        "shared": {stage: donor.rsplit("/", 1)[-1] for stage, donor in donors.items()},
    }
    try:
        with local_run_dir(out, inputs=[""]) as run_dir:
            for stage, donor in donors.items():
                share_stage(donor, run_dir, stage, cfg)
            metrics = flatten_metrics(resolve(experiment)(cfg, str(run_dir)))
        row.update(status="succeeded", metrics=metrics, error=None)
    except Exception as exc:  # noqa: BLE001 - reported as the trial's row, then the trial fails
        logging.getLogger(__name__).exception("experiment %s failed", name)
        row.update(status="failed", metrics={}, error=f"{type(exc).__name__}: {exc}")
    row["seconds"] = round(time.time() - started, 3)
    if row["status"] == "succeeded":
        storage.write_text(storage.join(out, "experiment.json"), json.dumps(row, indent=2))
    return row


def share_stage(donor: str, run_dir: Path, stage: str, cfg: Config) -> None:
    """Put the donor run's finished outputs of `stage` (its instances for `cfg`, whose keys agree
    with the donor's) into `run_dir`, unless it has its own. A local donor's are symlinked
    (relative links, so a sweep directory can move); a URI donor's are copied."""
    root = Path("/run")
    for path in stages.outputs_of(stage, cfg, RunDir(root)):
        part = path.relative_to(root).as_posix()
        source, target = storage.join(donor, part), run_dir / part
        if target.exists() or target.is_symlink() or not storage.exists(storage.join(source, MARKER)):
            continue
        if storage.is_uri(source):
            storage.download(source, target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(source, target.parent), target_is_directory=True)


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


def _finished(exp: Experiment, out: str, experiment: str) -> dict | None:
    location = storage.join(out, exp.dirname, "experiment.json")
    if not storage.exists(location):
        return None
    row = json.loads(storage.read_text(location))
    return row if row.get("fingerprint") == _fingerprint(exp.cfg, experiment) else None


def _fingerprint(cfg: Config, experiment: str) -> str:
    """What an experiment's row stands for: every result setting, the experiment function and the
    execution-only choice of what runs (the variants tuned, whether the zero-shot LLM is scored)."""
    what = [cfg.section_hash(*asdict(cfg).keys()), experiment, list(cfg.tune.variants), cfg.score.zero_shot]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()

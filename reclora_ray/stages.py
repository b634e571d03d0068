"""The stage table: every stage of a run, declared once.

A `Stage` says what it is called and what it does (the CLI help), which stages it reads, where
its output lives in the run directory, which config sections its result depends on, its
instances in a task's run (one per CRM, per variant, ...) and the function that runs it. From
this table alone come

- the CLI: one `reclora <command>` per stage (reclora_ray/cli.py), with the run-directory parts a
  URI --out downloads;
- `reclora run` (reclora_ray/pipeline.py): a task's stages in table order, each over its instances,
  for the CTR task (the paper's Table 2) and for next-item ranking alike;
- the Ray Job scripts (jobs/stage.py NAME, and one named script per stage);
- the sweep's upstream sharing (reclora_ray/cluster/sweep.py): experiments whose keys for a
  `shared` stage agree compute it once;
- every fingerprint (`StageRun`): one recipe, the declared config sections (execution-only fields
  left out: config.execution) + the identities of the upstream outputs the instance reads
  (rundir.with_inputs), so a retrained CRM invalidates everything built on it.

Adding a stage = one module with its run function + one entry here. A run function is named by
import path and imported only when the stage runs (so `reclora --help` stays fast); it is called
as `fn(cfg, run, key, overwrite)` and uses `StageRun` for the protocol: skip when done, refuse
another config's output, write into a staged directory with its marker and resolved config.

This module imports only the config, the run directory and the variants: stage modules import
it, never the other way round.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from reclora_ray.config import DATASETS, Config, ConfigError, load_config
from reclora_ray.rundir import MARKER, RunDir, check_can_write, inputs_hash, read_marker, staged_output, with_inputs
from reclora_ray.variants import crm_name, get_variant

log = logging.getLogger(__name__)

TASKS = ("ctr", "next-item")
Key = Any  # an instance's key: None (one instance), a CRM name, a variant name


@dataclass(frozen=True)
class Option:
    """A command-line option of a stage: it sets a config key (`key`), or chooses instances."""

    flag: str
    help: str
    key: str | None = None  # the config key it sets, e.g. data.raw_dir
    choices: tuple[str, ...] | None = None
    repeat: bool = False  # repeatable (--variant a --variant b)


def _one(cfg: Config, task: str) -> list[Key]:
    return [None]


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    run: str  # "module:function", called as fn(cfg, run, key, overwrite)
    part: str  # its top-level folder in the run directory ("" : files at the top, no marker)
    output: Callable[[RunDir, Config, Key], Path] | None = None  # None: OUT/<part>
    inputs: tuple[str, ...] = ()  # the stages it may read
    # The inputs one instance reads, as (stage, key); default: every input's single instance.
    reads: Callable[[Config, Key], list[tuple[str, Key]]] | None = None
    sections: tuple[str, ...] = ()  # config sections ("crm") or fields ("run.seed") its result depends on
    ignore: tuple[str, ...] = ()  # fields of those sections it does not depend on
    instances: Callable[[Config, str], list[Key]] = _one  # its instances in a task's run
    tasks: tuple[str, ...] = ("ctr",)
    config: Callable[[Config, Key], Config] | None = None  # the config an instance runs with
    files: str | None = None  # "module:function": cfg -> the raw files it reads (their stats fingerprinted)
    title: Callable[[Key], str] | None = None  # its console line in `reclora run`
    shared: bool = False  # a sweep's experiments share it when their keys agree
    # CLI: its command (None: none of its own), options, and the instances a command runs
    command: str | None = ""
    options: tuple[Option, ...] = ()
    select: Callable[[Config, argparse.Namespace], list[Key]] | None = None
    takes_timings: bool = False  # the report: gets the stage wall times of `reclora run`
    layout: str = ""  # where it writes, as docs/architecture.md says it; default OUT/<part>

    @property
    def cli(self) -> str | None:
        return self.name if self.command == "" else self.command

    def path(self, run: RunDir, cfg: Config, key: Key = None) -> Path:
        return self.output(run, cfg, key) if self.output else run.root / self.part

    def config_for(self, cfg: Config, key: Key) -> Config:
        return self.config(cfg, key) if self.config else cfg

    def upstream(self, cfg: Config, key: Key) -> list[tuple[str, Key]]:
        return self.reads(cfg, key) if self.reads else [(name, None) for name in self.inputs]

    def function(self) -> Callable:
        module, _, attr = self.run.partition(":")
        return getattr(importlib.import_module(module), attr)

    def cli_instances(self, cfg: Config, args: argparse.Namespace) -> list[Key]:
        return self.select(cfg, args) if self.select else self.instances(cfg, "ctr")


# --------------------------------------------------------------------------- instances


def _variants(cfg: Config) -> list:
    return [get_variant(v) for v in cfg.tune.variants]


def _gated(cfg: Config, task: str) -> list:
    """The variants whose gate reads a CRM; the CTR run scores a CRM row even without one."""
    gated = [v for v in _variants(cfg) if v.uses_crm]
    return gated or ([get_variant("reclora")] if task == "ctr" else [])


def _upstream_of_crms(cfg: Config, task: str) -> list[Key]:
    """embed and retrieve: always for CTR; for next-item, only for a gate whose CRM reads the
    retrieved history."""
    return [None] if task == "ctr" or any(v.needs_retrieval for v in _gated(cfg, task)) else []


def _crm_instances(cfg: Config, task: str) -> list[Key]:
    return list(dict.fromkeys(crm_name(cfg, v) for v in _gated(cfg, task)))


def _crm_for(cfg: Config, name: Key) -> Config:
    model, recent = (name.removesuffix("-recent"), name.endswith("-recent")) if name else (cfg.crm.model, False)
    history = "recent" if recent else ("long" if name else cfg.crm.history)
    return dataclasses.replace(cfg, crm=dataclasses.replace(cfg.crm, model=model, history=history))


def _crm_reads(cfg: Config, name: Key) -> list[tuple[str, Key]]:
    return [("prepare", None)] + ([("retrieve", None)] if _crm_for(cfg, name).crm.history == "long" else [])


def _variant_reads(cfg: Config, name: Key, tuned: str | None = None, retrieval: bool = True) -> list[tuple[str, Key]]:
    """What a variant's tuning or scoring reads: the data, the retrieved histories it uses, the
    CRM its gate reads, and (`tuned`) its adapter."""
    v = get_variant(name)
    reads = [("prepare", None)]
    if retrieval and v.needs_retrieval:
        reads.append(("retrieve", None))
    if v.uses_crm:
        reads.append(("pretrain-crm", crm_name(cfg, v)))
    if tuned and v.adapter:
        reads.append((tuned, name))
    return reads


def _crm_row_reads(cfg: Config, name: Key) -> list[tuple[str, Key]]:
    """The CRM row: what the variant reads, then the CRM itself (named twice when the variant's
    gate reads it: the order every CRM score was fingerprinted with, so older runs carry over)."""
    return _variant_reads(cfg, name) + [("pretrain-crm", crm_name(cfg, get_variant(name)))]


def _variant_config(cfg: Config, name: Key) -> Config:
    return dataclasses.replace(cfg, tune=get_variant(name).tune_config(cfg.tune))  # a variant's own lr (ilora)


def _tuned(cfg: Config, task: str) -> list[Key]:
    return [v.name for v in _variants(cfg)]


def _scored(cfg: Config, task: str) -> list[Key]:
    return (["zero-shot"] if cfg.score.zero_shot else []) + list(cfg.tune.variants)


def _crm_row(cfg: Config, task: str) -> list[Key]:
    """The CRM alone, scored once: the CRM of the first gated variant."""
    return [_gated(cfg, task)[0].name]


def _crm_rows_next_item(cfg: Config, task: str) -> list[Key]:
    return list({crm_name(cfg, v): v.name for v in _gated(cfg, task)}.values())


def _tune_select(cfg: Config, args) -> list[Key]:
    return args.variant or [v.name for v in _variants(cfg) if v.adapter]


def _score_select(cfg: Config, args) -> list[Key]:
    return args.variant or _scored(cfg, "ctr")


VARIANT = Option("--variant", "variant(s) (default: tune.variants; for score also zero-shot and the CRM)", repeat=True)

STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            "prepare",
            "parse, label, k-core filter and split a raw log",
            "reclora_ray.data.prepare:run_stage",
            part="data",
            sections=("data", "run.seed"),
            files="reclora_ray.data.prepare:raw_files",
            tasks=TASKS,
            shared=True,
            options=(
                Option("--dataset", "overrides data.dataset", key="data.dataset", choices=DATASETS),
                Option("--raw-dir", "folder of the raw files; overrides data.raw_dir", key="data.raw_dir"),
            ),
        ),
        Stage(
            "embed",
            "semantic item embeddings (LLM hidden states + PCA)",
            "reclora_ray.retrieval.embed:run_stage",
            part="embeddings",
            inputs=("prepare",),
            sections=("embed", "llm"),
            ignore=("llm.max_length", "llm.chat_template"),  # prompt settings: no item text is a prompt
            instances=_upstream_of_crms,
            tasks=TASKS,
            shared=True,
        ),
        Stage(
            "retrieve",
            "long/short history retrieval per sample",
            "reclora_ray.retrieval.retrieve:run_stage",
            part="retrieval",
            inputs=("prepare", "embed"),
            sections=("retrieve",),
            reads=lambda cfg, key: [("prepare", None)] + ([("embed", None)] if cfg.retrieve.uses_embeddings else []),
            instances=_upstream_of_crms,
            tasks=TASKS,
            shared=True,
        ),
        Stage(
            "pretrain-crm",
            "train a conventional recommender on Ray Train",
            "reclora_ray.crm.train:run_stage",
            part="crm",
            output=lambda run, cfg, key: run.crm(key),
            layout="OUT/crm/<model>[-recent]",
            inputs=("prepare", "retrieve"),
            reads=_crm_reads,
            sections=("crm", "retrieve", "run.seed"),
            config=_crm_for,
            instances=_crm_instances,
            tasks=TASKS,
            shared=True,
            title=lambda key: (
                f"pretrain-crm {key.removesuffix('-recent')} ({'recent' if key.endswith('-recent') else 'long'} history)"
            ),
            options=(Option("--model", "the CRM to train (default: crm.model)", key="crm.model"),),
            select=lambda cfg, args: [cfg.crm.output_name],
        ),
        Stage(
            "tune",
            "Few2Many tuning of the personalized LoRA",
            "reclora_ray.llm.tune:run_stage",
            part="adapter",
            output=lambda run, cfg, key: run.adapter(key),
            layout="OUT/adapter/<variant>",
            inputs=("prepare", "retrieve", "pretrain-crm"),
            reads=_variant_reads,
            sections=("llm", "lora", "tune", "retrieve", "run.seed"),
            config=_variant_config,
            instances=_tuned,
            title=lambda key: f"tune {key}",
            options=(VARIANT,),
            select=_tune_select,
        ),
        Stage(
            "score-crm",
            "the CRM a gate reads, alone, on the test split",
            "reclora_ray.llm.score:run_crm_stage",
            part="scores",
            output=lambda run, cfg, key: run.scores(f"crm-{crm_name(cfg, get_variant(key))}"),
            layout="OUT/scores/crm-<model>[-recent]",
            inputs=("prepare", "retrieve", "pretrain-crm"),
            reads=_crm_row_reads,
            sections=("retrieve", "score"),
            ignore=("score.next_item",),
            instances=_crm_row,
            title=lambda key: "score the CRM",
            command="score",
            select=lambda cfg, args: [] if args.variant else _crm_row(cfg, "ctr"),
        ),
        Stage(
            "score",
            "batch scoring with Ray Data",
            "reclora_ray.llm.score:run_stage",
            part="scores",
            output=lambda run, cfg, key: run.scores(key),
            layout="OUT/scores/<variant>",
            inputs=("prepare", "retrieve", "pretrain-crm", "tune"),
            reads=lambda cfg, key: _variant_reads(cfg, key, tuned="tune"),
            sections=("llm", "retrieve", "score", "run.seed"),
            ignore=("score.next_item",),
            instances=_scored,
            title=lambda key: f"score {key}",
            options=(VARIANT,),
            select=_score_select,
        ),
        Stage(
            "report",
            "tables and plots of every scored model",
            "reclora_ray.report:run_stage",
            part="",
            inputs=("prepare", "pretrain-crm", "tune", "score-crm", "score"),
            takes_timings=True,
            layout="OUT/report.md, OUT/metrics.json, OUT/*.png",
        ),
        # The next-item task (iLoRA's): the same upstream stages, its own outputs under OUT/next-item/.
        Stage(
            "tune-next-item",
            "tuning on the next-item task",
            "reclora_ray.llm.next_item_tune:run_stage",
            part="next-item",
            output=lambda run, cfg, key: run.next_item_adapter(key),
            layout="OUT/next-item/adapter/<variant>",
            inputs=("prepare", "pretrain-crm"),
            reads=lambda cfg, key: _variant_reads(cfg, key, retrieval=False),
            sections=("llm", "lora", "tune", "retrieve", "run.seed"),
            config=_variant_config,
            instances=_tuned,
            tasks=("next-item",),
            title=lambda key: f"tune {key} (next item)",
            command=None,
        ),
        Stage(
            "score-next-item-crm",
            "a CRM alone on the next-item candidates",
            "reclora_ray.llm.next_item_score:run_crm_stage",
            part="next-item",
            output=lambda run, cfg, key: run.next_item_scores(f"crm-{crm_name(cfg, get_variant(key))}"),
            layout="OUT/next-item/scores/crm-<model>[-recent]",
            inputs=("prepare", "pretrain-crm"),
            reads=lambda cfg, key: _variant_reads(cfg, key, retrieval=False),
            sections=("retrieve", "score"),
            ignore=("score.next_item",),
            instances=_crm_rows_next_item,
            tasks=("next-item",),
            title=lambda key: f"score the CRM of {key} (next item)",
            command=None,
        ),
        Stage(
            "score-next-item",
            "every model ranks the next-item candidates",
            "reclora_ray.llm.next_item_score:run_stage",
            part="next-item",
            output=lambda run, cfg, key: run.next_item_scores(key),
            layout="OUT/next-item/scores/<variant>",
            inputs=("prepare", "pretrain-crm", "tune-next-item"),
            reads=lambda cfg, key: _variant_reads(cfg, key, tuned="tune-next-item", retrieval=False),
            sections=("llm", "retrieve", "score", "run.seed"),
            instances=_scored,
            tasks=("next-item",),
            title=lambda key: f"score {key} (next item)",
            command=None,
        ),
        Stage(
            "report-next-item",
            "the next-item report",
            "reclora_ray.llm.next_item_report:run_stage",
            part="",
            inputs=("score-next-item-crm", "score-next-item"),
            tasks=("next-item",),
            command=None,
            takes_timings=True,
            layout="OUT/next-item/report.md, OUT/next-item/metrics.json",
        ),
    ]
}


# --------------------------------------------------------------------------- fingerprints


def own_fingerprint(stage: Stage, cfg: Config, key: Key = None) -> str:
    """The config side of a stage instance's fingerprint: its name, key and declared sections
    (execution-only fields and `ignore` left out). `cfg` is the instance's (config_for)."""
    payload = {"stage": stage.name, "key": key, "config": cfg.fingerprint_payload(*stage.sections, ignore=stage.ignore)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{key}-{digest}" if key else digest  # "reclora-...": which instance, at a glance


def sweep_key(stage: Stage | str, cfg: Config, key: Key = None) -> str:
    """What a stage instance depends on, from the config alone: its own fingerprint and, in turn,
    its upstream instances'. Two configs with the same key compute the same output."""
    stage = STAGES[stage] if isinstance(stage, str) else stage
    cfg = stage.config_for(cfg, key)
    payload = [own_fingerprint(stage, cfg, key), [sweep_key(n, cfg, k) for n, k in stage.upstream(cfg, key)]]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


class MissingInput(FileNotFoundError):
    """A stage's upstream output is not there (or not finished); the message says what to run."""


class StageRun:
    """One instance of a stage in one run directory: where it writes, its fingerprint, and the
    protocol every stage follows.

        stage = StageRun("embed", cfg, run)
        if stage.up_to_date(overwrite):
            return stage.out
        ...                                   # the stage's own work
        with stage.write() as tmp:            # marker, resolved config; renamed into place
            ...
    """

    def __init__(
        self, name: str, cfg: Config, run: RunDir | str | Path, key: Key = None, out: str | Path | None = None
    ):
        self.stage = STAGES[name]
        self.run = RunDir.of(run)
        self.run.upgrade()
        self.key = key
        self.cfg = self.stage.config_for(cfg, key)
        self.out = Path(out) if out is not None else self.stage.path(self.run, self.cfg, key)
        self.inputs = [
            (STAGES[n], k, STAGES[n].path(self.run, self.cfg, k)) for n, k in self.stage.upstream(self.cfg, key)
        ]
        self.files = self.stage_files(self.cfg)
        self.own = own_fingerprint(self.stage, self.cfg, key)
        self.fingerprint = with_inputs(self.own, [p for _, _, p in self.inputs], self.files)

    def stage_files(self, cfg: Config) -> list[Path]:
        if not self.stage.files:
            return []
        module, _, attr = self.stage.files.partition(":")
        return list(getattr(importlib.import_module(module), attr)(cfg))

    def up_to_date(self, overwrite: bool = False) -> bool:
        """True when the output is finished for this fingerprint (the stage is skipped); raises
        StageOutputExists for another config's output, MissingInput for an unfinished input."""
        if not check_can_write(self.out, self.fingerprint, overwrite, carries_over=self._carries_over):
            return True
        for stage, _key, path in self.inputs:
            # A directory without a marker is read as it is (a hand-made prepared dataset that
            # follows the contract); its loaders check it. One that is not there is an error here.
            if read_marker(path) is None and not Path(path).exists():
                what = f"`reclora {stage.cli}`" if stage.cli else f"`reclora run --task {stage.tasks[0]}`"
                raise MissingInput(f"{path} does not exist: no {stage.name} output yet; run {what} first")
        return False

    @contextmanager
    def write(self, extra: dict | None = None) -> Iterator[Path]:
        """A staged directory that becomes the output, with its marker and the resolved config."""
        with staged_output(self.out, self.fingerprint, extra) as tmp:
            yield tmp
            (tmp / "config.yaml").write_text(self.cfg.to_yaml())

    def _carries_over(self, marker: dict) -> bool:
        """An output written before fingerprint recipe 2 is valid for this instance when the config
        saved beside it gives the same own fingerprint and it was built on the same inputs."""
        saved = self.out / "config.yaml"
        old = str(marker.get("fingerprint", ""))
        if not saved.is_file() or "." not in old:
            return False
        try:
            then = self.stage.config_for(load_config(str(saved)), self.key)
        except (ConfigError, OSError):
            return False
        same_inputs = old.rsplit(".", 1)[1] == inputs_hash([p for _, _, p in self.inputs], self.stage_files(then))
        return same_inputs and own_fingerprint(self.stage, then, self.key) == self.own


# --------------------------------------------------------------------------- running


def task_stages(task: str) -> list[Stage]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    return [s for s in STAGES.values() if task in s.tasks]


def execute(
    stage: Stage | str, cfg: Config, run: RunDir | str | Path, key: Key = None, overwrite: bool = False, **kwargs
) -> Any:
    """Run one stage instance through its run function."""
    stage = STAGES[stage] if isinstance(stage, str) else stage
    return stage.function()(cfg, RunDir.of(run), key, overwrite, **kwargs)


def commands() -> dict[str, list[Stage]]:
    """{CLI command: the stages it runs, in table order}."""
    out: dict[str, list[Stage]] = {}
    for stage in STAGES.values():
        if stage.cli:
            out.setdefault(stage.cli, []).append(stage)
    return out


def uri_inputs(command: str) -> list[str]:
    """The run-directory parts a command reads (downloaded when --out is a URI)."""
    parts = [STAGES[i].part for s in commands()[command] for i in s.inputs]
    return list(dict.fromkeys(p for p in parts if p))


def outputs_of(stage: Stage | str, cfg: Config, run: RunDir, task: str = "ctr") -> list[Path]:
    """Where a stage's instances in a task's run write."""
    stage = STAGES[stage] if isinstance(stage, str) else stage
    return [stage.path(run, stage.config_for(cfg, k), k) for k in stage.instances(cfg, task)]


def is_finished(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def markdown_table() -> str:
    """The stage table as docs/architecture.md shows it (a test keeps the two the same)."""
    rows = ["| stage | command | reads | writes | its result depends on | tasks |", "|---|---|---|---|---|---|"]
    for s in STAGES.values():
        depends = ", ".join(s.sections) + (f" (not {', '.join(s.ignore)})" if s.ignore else "")
        rows.append(
            f"| {s.name} | {s.cli or '(reclora run --task next-item)'} | {', '.join(s.inputs) or '(raw files)'} "
            f"| {s.layout or 'OUT/' + s.part} | {depends or '(what it reads)'} | {', '.join(s.tasks)} |"
        )
    return "\n".join(rows)

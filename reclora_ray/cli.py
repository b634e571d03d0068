"""`reclora` entry point: one sub-command per stage of the stage table, plus `run` and tools.

The stage commands come from reclora_ray/stages.py (their help, options and the instances they
run); the tools (`run`, `synth`, `export-data`, `serve`, `export-adapter`) are modules exposing
`add_arguments(parser)` and `main(args) -> int`. Modules are imported only when their command
runs, so `reclora --help` stays fast and a stage's heavy imports (torch, ray, transformers) are
paid by the stage that needs them.

--out may be a local/shared path or any pyarrow URI (s3://, gs://, file://, ...): for a URI the
command runs in a local run directory holding the parts of OUT it reads (the outputs of its
stages' inputs) and the outputs it finishes are uploaded, markers last (rundir.local_run_dir).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from reclora_ray import stages, storage
from reclora_ray.config import ConfigError
from reclora_ray.console import setup_logging, stage_line
from reclora_ray.rundir import StageOutputExists, local_run_dir
from reclora_ray.runtime import add_common_arguments, config_from_args

# Commands that are not stages: {name: (module, help, run-directory parts read at a URI or None)}.
TOOLS: dict[str, tuple[str, str, list[str] | None]] = {
    "export-data": ("reclora_ray.data.export", "a benchmark's raw files in the generic CSV layout", None),
    "synth": ("reclora_ray.data.synth", "write a synthetic raw log in the ML-25M format", None),
    "run": ("reclora_ray.pipeline", "every stage in order, skipping finished ones", [""]),
    "serve": ("reclora_ray.serve.app", "online personalized scoring with Ray Serve", None),
    "export-adapter": ("reclora_ray.serve.export", "one user's adapter as a PEFT LoRA (or a merged model)", None),
}


def commands() -> dict[str, str]:
    """{command: help}: every stage command (table order), then the tools."""
    out = {name: group[0].help if len(group) == 1 else group[-1].help for name, group in stages.commands().items()}
    return out | {name: help_text for name, (_, help_text, _) in TOOLS.items()}


def uri_inputs(command: str) -> list[str] | None:
    """The run-directory parts a command reads ("" = all), downloaded when --out is a URI;
    None: the command takes a local path only."""
    if command in TOOLS:
        return TOOLS[command][2]
    return stages.uri_inputs(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reclora", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in commands().items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def add_stage_arguments(parser: argparse.ArgumentParser, group: list[stages.Stage]) -> None:
    add_common_arguments(parser)
    seen = set()
    for stage in group:
        for option in stage.options:
            if option.flag in seen:
                continue
            seen.add(option.flag)
            parser.add_argument(
                option.flag,
                help=option.help,
                choices=option.choices,
                action="append" if option.repeat else "store",
                dest=option.flag.lstrip("-").replace("-", "_"),
            )


def run_stage_command(group: list[stages.Stage], args: argparse.Namespace) -> int:
    """A stage command: the config with the options' keys set, then each stage's instances."""
    overrides = [
        f"{o.key}={json.dumps(getattr(args, o.flag.lstrip('-').replace('-', '_')))}"
        for s in group
        for o in s.options
        if o.key and getattr(args, o.flag.lstrip("-").replace("-", "_")) is not None
    ]
    args.overrides = list(args.overrides) + list(dict.fromkeys(overrides))
    cfg = config_from_args(args)
    scored = {}
    for stage in group:
        for key in stage.cli_instances(cfg, args):
            result = stages.execute(stage, cfg, args.out, key, args.overwrite)
            if isinstance(result, dict):  # the report's payload
                print(json.dumps(result, indent=2))
            elif stage.part == "scores":
                scored[result.name] = json.loads((result / "metrics.json").read_text())
    if scored:
        print(json.dumps(scored, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command name is parsed first; its stages (or its module) then declare the rest.
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    known = build_parser().parse_args(argv[: split + 1])
    group = stages.commands().get(known.command)
    cmd_parser = argparse.ArgumentParser(prog=f"reclora {known.command}", description=commands()[known.command])
    cmd_parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    if group:
        add_stage_arguments(cmd_parser, group)
        run_command = lambda args: run_stage_command(group, args)  # noqa: E731
    else:
        module = importlib.import_module(TOOLS[known.command][0])
        cmd_parser.description = module.__doc__
        module.add_arguments(cmd_parser)
        run_command = module.main
    args = cmd_parser.parse_args(argv[split + 1 :])
    setup_logging(args.verbose or known.verbose)
    log = logging.getLogger("reclora")

    try:
        with stage_line(log, f"reclora {known.command}"):
            out = getattr(args, "out", None)
            if out is None or not storage.is_uri(out):
                return int(run_command(args) or 0)
            parts = uri_inputs(known.command)
            if parts is None:
                raise ValueError(f"reclora {known.command} --out {out}: this command takes a local path only")
            with local_run_dir(out, parts) as local:
                args.out = str(local)
                return int(run_command(args) or 0)
    except (ConfigError, StageOutputExists, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())

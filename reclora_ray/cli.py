"""`reclora` entry point: one sub-command per stage, plus `run` and `synth`.

Each stage module exposes `add_arguments(parser)` and `main(args) -> int`; modules are imported
only when their command runs, so `reclora --help` stays fast and a stage's heavy imports
(torch, ray, transformers) are paid by the stage that needs them.

--out may be a local/shared path or any pyarrow URI (s3://, gs://, file://, ...): for a URI the
stage runs in a local run directory holding the parts of OUT it reads (URI_INPUTS) and the
outputs it finishes are uploaded, markers last (reclora_ray.storage.local_run_dir).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from reclora_ray.config import ConfigError
from reclora_ray.console import setup_logging, stage_line
from reclora_ray.rundir import StageOutputExists

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("reclora_ray.data.prepare", "parse, label, k-core filter and split a raw log"),
    "export-data": ("reclora_ray.data.export", "a benchmark's raw files in the generic CSV layout"),
    "synth": ("reclora_ray.data.synth", "write a synthetic raw log in the ML-25M format"),
    "embed": ("reclora_ray.retrieval.embed", "semantic item embeddings (LLM hidden states + PCA)"),
    "retrieve": ("reclora_ray.retrieval.retrieve", "long/short history retrieval per sample"),
    "pretrain-crm": ("reclora_ray.crm.train", "train a conventional recommender on Ray Train"),
    "tune": ("reclora_ray.llm.tune", "Few2Many tuning of the personalized LoRA"),
    "score": ("reclora_ray.llm.score", "batch scoring with Ray Data"),
    "report": ("reclora_ray.report", "tables and plots of every scored model"),
    "run": ("reclora_ray.pipeline", "every stage in order, skipping finished ones"),
    "serve": ("reclora_ray.serve.app", "online personalized scoring with Ray Serve"),
    "export-adapter": ("reclora_ray.serve.export", "one user's adapter as a PEFT LoRA (or a merged model)"),
}


# The run-directory parts each stage reads ("" = all of it), downloaded when --out is a URI.
URI_INPUTS: dict[str, list[str]] = {
    "prepare": [],
    "embed": ["data"],
    "retrieve": ["data", "embeddings"],
    "pretrain-crm": ["data"],
    "tune": ["data", "crm"],
    "score": ["data", "crm", "adapter"],
    "report": ["scores"],
    "run": [""],
}


def add_common_arguments(parser: argparse.ArgumentParser, out_required: bool = True) -> None:
    """Arguments every stage takes: the config, overrides and the run directory."""
    parser.add_argument("--config", default="quickstart", help="packaged config name or YAML path")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set crm.lr=1e-3 (repeatable)",
    )
    parser.add_argument("--out", required=out_required, help="the run directory (DESIGN.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of another config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reclora", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command name is parsed first; its module then declares the rest of the arguments.
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    known = build_parser().parse_args(argv[: split + 1])
    module = importlib.import_module(known._module)
    cmd_parser = argparse.ArgumentParser(prog=f"reclora {known.command}", description=module.__doc__)
    cmd_parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[split + 1:])
    setup_logging(args.verbose or known.verbose)
    log = logging.getLogger("reclora")
    from reclora_ray import storage

    try:
        with stage_line(log, f"reclora {known.command}"):
            out = getattr(args, "out", None)
            if out is None or not storage.is_uri(out):
                return int(module.main(args) or 0)
            if known.command not in URI_INPUTS:
                raise ValueError(f"reclora {known.command} --out {out}: this command takes a local path only")
            with storage.local_run_dir(out, URI_INPUTS[known.command]) as local:
                args.out = str(local)
                return int(module.main(args) or 0)
    except (ConfigError, StageOutputExists, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())

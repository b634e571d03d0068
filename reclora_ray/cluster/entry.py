"""What every stage entry point in jobs/ does: run one `reclora` stage whose --out may be a URI.

A local or shared-filesystem --out is passed through. A URI (s3://, gs://, file://, ...) is
stood in for by a local run directory (`storage.local_run_dir`): the stage's inputs are
downloaded into it, the stage runs on local files, and the outputs it finishes are uploaded to
the URI, markers last.
"""

from __future__ import annotations

import argparse

from reclora_ray import storage
from reclora_ray.cli import main as cli_main


def run_stage(command: str, argv: list[str], inputs: list[str]) -> int:
    """`reclora COMMAND ARGV`; `inputs`: the run-directory parts the stage reads (e.g. ["data"])."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out")
    out = parser.parse_known_args(argv)[0].out
    if out is None or not storage.is_uri(out):
        return cli_main([command, *argv])
    with storage.local_run_dir(out, inputs) as local:
        return cli_main([command, *argv, "--out", str(local)])  # the last --out wins

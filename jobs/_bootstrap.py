"""The one start-up of every Ray Job script in jobs/: this checkout's reclora_ray first on the path.

The repository root (the job's working dir) goes first on the path of this driver and, through
PYTHONPATH, of the local Ray workers it starts, so both import this checkout's reclora_ray.
A script imports this module by its bare name (its own folder is first on sys.path).
"""

import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(
    dict.fromkeys(p for p in (ROOT, *os.environ.get("PYTHONPATH", "").split(os.pathsep)) if p)
)


def run_command(command: str, argv: list[str] | None = None) -> int:
    """`reclora <command> ARGS...` (a stage of reclora_ray/stages.py, or `run`)."""
    from reclora_ray.cli import main

    return main([command, *(sys.argv[1:] if argv is None else argv)])

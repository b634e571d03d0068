"""Ray Jobs entry point for `reclora prepare` (same arguments):

    python jobs/prepare_data.py --config quickstart --out runs/quickstart
    ray job submit --working-dir . -- python jobs/prepare_data.py --config ml-25m --raw-dir /data/ml-25m --out /shared/runs/ml25m

Under `ray job submit` RAY_ADDRESS is set, so the stage runs on that cluster. --out may be a
shared path or any pyarrow URI (s3://, gs://, ...; see reclora_ray/cli.py).
"""

import os
import sys
from pathlib import Path

# The repository root (the job's working dir) goes first on the path of this driver and, through
# PYTHONPATH, of the local Ray workers it starts, so both import this checkout's reclora_ray.
ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

from reclora_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))

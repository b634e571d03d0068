"""Ray Job entry point for `reclora pretrain-crm` (same arguments):

    python jobs/pretrain_crm.py --config quickstart --model sim --out runs/quickstart
    ray job submit --working-dir . -- python jobs/pretrain_crm.py --config ml-1m --out s3://BUCKET/runs/ml-1m

Inside a Ray Job the Ray Train run joins the job's cluster (RAY_ADDRESS is set by Ray). --out
may be a shared path or any pyarrow URI (OUT/data is downloaded, OUT/crm/<model> uploaded).
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
    sys.exit(main(["pretrain-crm", *sys.argv[1:]]))

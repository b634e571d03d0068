"""Ray Job entry point for `reclora embed`: semantic item embeddings (LLM hidden states, PCA, unit vectors).

    python jobs/embed_items.py --config quickstart --out runs/quickstart
    ray job submit --working-dir . -- python jobs/embed_items.py --config ml-1m --out /shared/runs/ml-1m

Arguments are those of `reclora embed`; inside a Ray Job the stage joins the job's cluster
(RAY_ADDRESS is set by Ray). --out may be a shared path or any pyarrow URI.
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
    sys.exit(main(["embed", *sys.argv[1:]]))

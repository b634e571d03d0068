"""Ray Job entry point for `reclora embed`: semantic item embeddings (LLM hidden states, PCA, unit vectors).

    python jobs/embed_items.py --config quickstart --out runs/quickstart
    ray job submit --working-dir . -- python jobs/embed_items.py --config ml-1m --out /shared/runs/ml-1m

Arguments are those of `reclora embed`; inside a Ray Job the stage joins the job's cluster
(RAY_ADDRESS is set by Ray). --out may be a shared path or any pyarrow URI.
"""

import sys

from _bootstrap import run_command

if __name__ == "__main__":
    sys.exit(run_command("embed"))

"""Ray Job entry point for `reclora run`: every stage in order, skipping finished ones (the main job).

    python jobs/run_pipeline.py --config quickstart --out runs/quickstart
    ray job submit --working-dir . -- python jobs/run_pipeline.py --config ml-1m --out s3://BUCKET/runs/ml-1m

Arguments are those of `reclora run`; inside a Ray Job the stage joins the job's cluster
(RAY_ADDRESS is set by Ray). --out may be a shared path or any pyarrow URI (see reclora_ray/cli.py).
"""

import sys

from _bootstrap import run_command

if __name__ == "__main__":
    sys.exit(run_command("run"))

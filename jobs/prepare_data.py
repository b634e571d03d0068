"""Ray Jobs entry point for `reclora prepare` (same arguments):

    python jobs/prepare_data.py --config quickstart --out runs/quickstart
    ray job submit --working-dir . -- python jobs/prepare_data.py --config ml-25m --raw-dir /data/ml-25m --out /shared/runs/ml25m

Under `ray job submit` RAY_ADDRESS is set, so the stage runs on that cluster. --out may be a
shared path or any pyarrow URI (s3://, gs://, ...; see reclora_ray/cli.py).
"""

import sys

from _bootstrap import run_command

if __name__ == "__main__":
    sys.exit(run_command("prepare"))

"""Ray Job entry point for `reclora pretrain-crm` (same arguments):

    python jobs/pretrain_crm.py --config quickstart --model sim --out runs/quickstart
    ray job submit --working-dir . -- python jobs/pretrain_crm.py --config ml-1m --out s3://BUCKET/runs/ml-1m

Inside a Ray Job the Ray Train run joins the job's cluster (RAY_ADDRESS is set by Ray). --out
may be a shared path or any pyarrow URI (OUT/data is downloaded, OUT/crm/<model> uploaded).
"""

import sys

from _bootstrap import run_command

if __name__ == "__main__":
    sys.exit(run_command("pretrain-crm"))

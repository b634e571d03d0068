"""Ray Job entry point for `reclora pretrain-crm`:

    python jobs/pretrain_crm.py --config quickstart --model sim --out runs/quickstart
    ray job submit --working-dir . -- python jobs/pretrain_crm.py --config quickstart --out runs/quickstart
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir when submitted as a job

from reclora_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pretrain-crm", *sys.argv[1:]]))

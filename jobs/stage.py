"""Ray Job entry point for any stage of the stage table (reclora_ray/stages.py), by its command:

    python jobs/stage.py embed --config quickstart --out runs/quickstart
    ray job submit --working-dir . -- python jobs/stage.py retrieve --config ml-1m --out s3://BUCKET/runs/ml-1m

Arguments after the command are that command's (`reclora <command> --help`). Inside a Ray Job
the stage joins the job's cluster (RAY_ADDRESS is set by Ray); --out may be a shared path or any
pyarrow URI. The named scripts beside this one (prepare_data.py, embed_items.py, ...) are the same
entry point for one stage each.
"""

import sys

from _bootstrap import run_command

from reclora_ray.stages import commands

if __name__ == "__main__":
    names = [*commands(), "run"]
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        print(f"usage: python jobs/stage.py COMMAND [ARGS...]; COMMAND one of {', '.join(names)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_command(sys.argv[1], sys.argv[2:]))

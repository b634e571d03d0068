"""Run a grid (or a random search) of experiments as Ray Tune trials; merge their metrics into one table.

    python jobs/sweep.py --config ml-1m --out OUT --grid lora.n_meta=1,2,4,8,16
    ray job submit --working-dir . -- python jobs/sweep.py --spec cluster/sweeps/table3.yaml \
        --config ml-1m --out s3://BUCKET/sweeps/table3

Writes OUT/<experiment>/ (each experiment's run directory), OUT/sweep.json and OUT/sweep.md.
See reclora_ray/cluster/sweep.py for how experiments ask for resources and share upstream stages.
"""

import argparse
import logging
import sys

import _bootstrap  # noqa: F401  (this checkout's reclora_ray first on the path)

from reclora_ray.cluster.sweep import SweepSpec, expand, parse_grid_arg, run_sweep
from reclora_ray.config import ConfigError, load_config
from reclora_ray.console import setup_logging
from reclora_ray.runtime import init_ray


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="sweep directory (local path or URI)")
    parser.add_argument("--spec", help="sweep YAML (variants, grid, overrides, resources, ...)")
    parser.add_argument("--config", help="base config (packaged name or YAML); overrides the spec's")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every experiment (repeatable)",
    )
    parser.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2,...", help="a grid axis (repeatable; axes combine)"
    )
    parser.add_argument("--experiment", help="experiment function, module:function")
    parser.add_argument("--task-cpus", type=float, help="CPUs each experiment task asks for")
    parser.add_argument("--task-gpus", type=float, help="GPUs each experiment task asks for")
    parser.add_argument("--max-concurrent", type=int, help="experiments running at once (max_concurrent_trials)")
    parser.add_argument("--search", choices=["grid", "random"], help="every grid point, or --num-samples drawn")
    parser.add_argument("--num-samples", type=int, help="points a random search draws")
    parser.add_argument(
        "--no-share-upstream",
        action="store_true",
        help="run every experiment at once, each computing its own upstream stages",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        spec = SweepSpec.from_yaml(args.spec) if args.spec else SweepSpec()
        spec.config = args.config or spec.config
        spec.overrides = spec.overrides + args.overrides
        spec.grid = {**spec.grid, **dict(parse_grid_arg(g) for g in args.grid)}
        spec.experiment = args.experiment or spec.experiment
        if args.task_cpus is not None:
            spec.resources = {**spec.resources, "num_cpus": args.task_cpus}
        if args.task_gpus is not None:
            spec.resources = {**spec.resources, "num_gpus": args.task_gpus}
        spec.max_concurrent = args.max_concurrent or spec.max_concurrent
        spec.share_upstream = spec.share_upstream and not args.no_share_upstream
        spec.search = args.search or spec.search
        spec.num_samples = args.num_samples or spec.num_samples

        # Inside `ray job submit`, RAY_ADDRESS points at the cluster; else a local Ray on 127.0.0.1
        # with a private token, as every stage starts it.
        expand(spec)  # every experiment's config is valid before a Ray starts
        init_ray(load_config(spec.config, spec.overrides))
        rows = run_sweep(spec, args.out)
    except ConfigError as exc:
        logging.getLogger("sweep").error("%s", exc)
        return 2
    failed = [r["name"] for r in rows if r["status"] != "succeeded"]
    if failed:
        logging.getLogger("sweep").error("%d experiments failed: %s", len(failed), failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

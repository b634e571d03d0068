"""Wall time of `reclora score` (the real stage: Ray Data reads, an actor pool, Parquet shards,
metrics) at several pool sizes, on one run directory and one fixed subsample of test prompts.

The stage scores the zero-shot variant by default: it needs no tuned adapter, so the bench needs
only a prepared run with embeddings and retrieval, which it builds under --run when missing
(prepare, embed, retrieve of --config). Each pool size scores the same prompts from scratch
(overwrite), the order rotated per round; the wall time includes starting the actors and
loading the model in each, as a user's `reclora score` does.

    python bench/score_pool.py --run /tmp/bench-pool --prompts 200 --concurrency 1 2

speedup_vs_first: the first pool size's median wall time over each one's. On a machine with C
cores, a pool of C actors should approach C x, less the per-actor model load.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reclora_ray.config import load_config  # noqa: E402
from reclora_ray.rundir import RunDir  # noqa: E402


def build_upstream(cfg, out: Path) -> None:
    """prepare, embed and retrieve through the stage table: each skips itself when up to date."""
    from reclora_ray.stages import execute

    for stage in ("prepare", "embed", "retrieve"):
        execute(stage, cfg, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path, help="run directory (built when missing)")
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--variant", default="zero-shot")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from reclora_ray.llm.score import score_variant
    from reclora_ray.predictions import read_predictions

    base = load_config(args.config, args.overrides)
    build_upstream(base, args.run)
    run = RunDir(args.run)
    times: dict[int, list[float]] = {c: [] for c in args.concurrency}
    p_yes = {}
    for r in range(args.rounds):
        order = args.concurrency[r % len(args.concurrency) :] + args.concurrency[: r % len(args.concurrency)]
        for c in order:
            cfg = load_config(
                args.config, [*args.overrides, f"score.llm_subsample={args.prompts}", f"score.concurrency={c}"]
            )
            t0 = time.perf_counter()
            out = score_variant(cfg, run, args.variant, overwrite=True)
            times[c].append(time.perf_counter() - t0)
            p_yes[c] = read_predictions(out, ["p_yes"])["p_yes"].to_numpy()
    first = args.concurrency[0]
    medians = {c: statistics.median(t) for c, t in times.items()}
    result = {
        "bench": "score_pool",
        "variant": args.variant,
        "prompts": args.prompts,
        "config": args.config,
        "overrides": args.overrides,
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "wall_s": {str(c): [round(t, 2) for t in ts] for c, ts in times.items()},
        "prompts_per_s": {str(c): round(args.prompts / m, 3) for c, m in medians.items()},
        "speedup_vs_first": {str(c): round(medians[first] / m, 3) for c, m in medians.items()},
        "max_abs_diff_p_yes_vs_first": {str(c): float(abs(p_yes[c] - p_yes[first]).max()) for c in p_yes},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

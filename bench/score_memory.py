"""Peak memory of the scoring driver on a synthetic large test split: before and after scoring
through Ray Data end to end (issue 20, item 5).

Builds the tiny run (prepare, embed, retrieve, pretrain the SIM CRM: the tiny config's real
stages; or reuses --run), replaces its test split by --rows rows (the tiny test samples and their
retrieved histories repeated under new sample ids), then scores the CRM alone on the whole split
(`score_crm`: the stage that scores every test row) once per mode, each in a fresh process:

  before  the package as of --before-ref (a git worktree of it, imported instead of this checkout):
          the driver reads the split into pandas, hands it to Ray Data, collects the scored rows
          with to_pandas() and writes one file
  after   this checkout: the workers read, score and write Parquet shards; metrics by the workers

The run is built by this checkout, so --before-ref must read its layout: 28acebb (the recorded
'before' in bench/results/score_memory_*.json) predates the top-level OUT/retrieval and stops
with "no retrieval output under .../data"; compare today's scoring with `--modes after`.

Per mode: the driver's peak RSS over the scoring call (sampled every 50 ms; the driver process
alone, not Ray's workers or object store), its RSS when the call starts, wall time, and the
metrics (equal in both modes: the same rows, the same model). Prints one JSON object.

    python bench/score_memory.py --rows 1000000 --out bench/results/score_memory_1m_cpu.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_TREE_ENV = "BENCH_SOURCE_TREE"  # the package a child imports: this checkout, or --before-ref's worktree
sys.path.insert(0, os.environ.get(SOURCE_TREE_ENV, str(ROOT)))

OVERRIDES = ["run.num_cpus=2", "crm.num_workers=1", "crm.cpus_per_worker=1", "score.concurrency=1"]


def build_run(run: Path) -> None:
    """The tiny run's prepare, embed, retrieve and SIM CRM, through the stage table."""
    from reclora_ray.config import load_config
    from reclora_ray.stages import execute

    cfg = load_config("tiny", OVERRIDES)
    for stage in ("prepare", "embed", "retrieve", "pretrain-crm"):
        execute(stage, cfg, run)


def synthesize_split(run: Path, rows: int) -> None:
    """OUT/data/samples/test.parquet and OUT/retrieval/test.parquet with `rows` rows: the
    tiny test rows repeated, sample ids renumbered (aligned row for row, as retrieve writes them)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples_path, retrieval_path = run / "data" / "samples" / "test.parquet", run / "retrieval" / "test.parquet"
    samples, retrieval = pq.read_table(samples_path), pq.read_table(retrieval_path)
    take = pa.array(np.resize(np.arange(samples.num_rows), rows))
    ids = pa.array(np.int64(10**9) + np.arange(rows, dtype=np.int64))  # beyond every real sample id
    big = samples.take(take).set_column(samples.schema.get_field_index("sample_id"), "sample_id", ids)
    hist = retrieval.take(take).set_column(retrieval.schema.get_field_index("sample_id"), "sample_id", ids)
    pq.write_table(big, samples_path)
    pq.write_table(hist, retrieval_path)


def worktree(ref: str) -> Path:
    """A detached git worktree of `ref`, so the 'before' child imports the whole package as it
    was (one old module over today's package breaks as soon as an import it uses moves)."""
    path = Path(tempfile.mkdtemp(prefix="score-memory-before-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(path), ref], check=True)
    return path


class DriverPeak:
    """This process's peak RSS, sampled in a thread while the block runs."""

    def __init__(self, every_s: float = 0.05):
        import psutil

        self.proc, self.every_s = psutil.Process(), every_s
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def child(mode: str, run: Path, ref: str) -> dict:
    import ray

    from reclora_ray.config import load_config
    from reclora_ray.rundir import RunDir
    from reclora_ray.runtime import init_ray

    cfg = load_config("tiny", OVERRIDES)
    module = importlib.import_module("reclora_ray.llm.score")
    init_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    shutil.rmtree(run / "scores", ignore_errors=True)
    started = time.perf_counter()
    with DriverPeak() as mem:
        out = module.score_crm(cfg, RunDir(run), overwrite=True)
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    ray.shutdown()
    return {
        "mode": mode,
        "driver_rss_at_start_mb": round(mem.start / 2**20, 1),
        "driver_peak_rss_mb": round(mem.peak / 2**20, 1),
        "driver_peak_growth_mb": round((mem.peak - mem.start) / 2**20, 1),
        "wall_s": round(wall, 1),
        "auc": metrics["auc"],
        "logloss": metrics["logloss"],
        "n": metrics["n"],
        "parquet_files": len(files),
        "example_file": files[0] if files else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--run", type=Path, help="a tiny run to build there, or reuse (its test split is replaced)")
    parser.add_argument("--modes", default="before,after")
    parser.add_argument("--before-ref", default="28acebb", help="the commit whose scoring is 'before'")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.run, args.before_ref)), flush=True)
        return 0

    work = None
    run = args.run
    if run is None:
        work = Path(tempfile.mkdtemp(prefix="score-memory-"))
        run = work / "run"
    if not (run / "crm" / "sim").is_dir():
        started = time.perf_counter()
        build_run(run)
        print(f"built the tiny run in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    synthesize_split(run, args.rows)
    results = []
    for mode in args.modes.split(","):
        tree = worktree(args.before_ref) if mode == "before" else ROOT
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--run", str(run), "--before-ref", args.before_ref],
                capture_output=True,
                text=True,
                env=os.environ | {"PYTHONPATH": str(tree), SOURCE_TREE_ENV: str(tree)},
            )
        finally:
            if tree != ROOT:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
            raise SystemExit(f"mode {mode} failed (exit {proc.returncode})")
        results.append(json.loads(line.removeprefix("RESULT ")))
        print(json.dumps(results[-1]), file=sys.stderr)
    import platform

    payload = {
        "bench": "score_memory",
        "rows": args.rows,
        "scorer": "score_crm (the tiny config's SIM CRM, whole split)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "before_ref": args.before_ref,
        "results": results,
    }
    print(json.dumps(payload, indent=2))
    if args.out:
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Online scoring under load: `reclora serve` in its own process, a bounded load from this one.

    python bench/serve_load.py --config tiny --run OUT                       # 1,000 x 20 candidates, 16 at a time
    python bench/serve_load.py --config quickstart --run OUT --requests 200 --set serve.max_batch_size=32

Starts `reclora serve --config C --run OUT` on a free loopback port (the run must hold a tuned
adapter of serve.variant), waits for GET /healthz, sends --warmup requests that are not timed,
then --requests POST /score requests from --concurrency concurrent clients, each for a random
known user and --candidates distinct random items; --with-history of them also carry two new
behaviours (the lifelong path). Latency is per request, send to full answer. The server is
stopped (SIGTERM, which shuts Serve and Ray down) at the end. A 503 with Retry-After is load
shed on purpose (serve.max_queued_requests): counted as "shed", not as an error; that client waits
Retry-After seconds and sends its next request (the shed one is not retried). A probe polls
GET /healthz every 0.5 s during the load ("healthz_p99_ms").
Last line: {"rps", "candidates_per_s", "p50_ms", "p99_ms", "errors", "shed", "shed_share", ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

log = logging.getLogger("serve_load")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "reclora_ray.cli",
        "serve",
        "--config",
        args.config,
        "--run",
        args.run,
        "--set",
        f"serve.port={port}",
        "--set",
        "serve.host=127.0.0.1",
    ]
    for override in args.set:
        command += ["--set", override]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    log.info("starting: %s (log: %s)", " ".join(command), log_path)
    return subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before becoming healthy")
        try:
            reply = httpx.get(f"{url}/healthz", timeout=5)
            if reply.status_code == 200:
                return reply.json()
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:.0f} s")


def make_requests(n: int, users: list, items: list, candidates: int, with_history: float, seed: int) -> list[dict]:
    """Bodies naming random known users and distinct random items by their catalogue ids."""
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(n):
        body = {
            "user_id": users[rng.integers(len(users))],
            "candidates": [items[i] for i in rng.choice(len(items), size=candidates, replace=False)],
        }
        if rng.random() < with_history:
            body["history"] = [
                {"item_id": items[i], "rating": float(rng.integers(1, 6))} for i in rng.choice(len(items), 2)
            ]
        bodies.append(body)
    return bodies


def catalogue_ids(run: str) -> tuple[list, list]:
    """The run's catalogue user and item ids (users.parquet / items.parquet raw_id)."""
    import pandas as pd

    from reclora_ray.data.catalogue import python_id
    from reclora_ray.rundir import RunDir

    data = RunDir(run).data
    return tuple(
        [python_id(v) for v in pd.read_parquet(data / f"{kind}.parquet", columns=["raw_id"])["raw_id"]]
        for kind in ("users", "items")
    )


async def send_all(url: str, bodies: list[dict], concurrency: int) -> dict:
    """{"latencies" of answered requests in s, "errors" (descriptions), "shed" (503s with
    Retry-After), "healthz" latencies in s, "wall" seconds}."""
    latencies, errors, shed, health = [], [], [], []
    queue = iter(bodies)
    done = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient):
        for body in queue:
            started = time.perf_counter()
            try:
                reply = await client.post("/score", json=body)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if reply.status_code == 503 and "retry-after" in reply.headers:
                shed.append(time.perf_counter() - started)
                await asyncio.sleep(float(reply.headers["retry-after"]))  # a polite client waits, then goes on
                continue
            if reply.status_code != 200 or len(reply.json()["scores"]) != len(body["candidates"]):
                errors.append(f"{reply.status_code}: {reply.text[:200]}")
                continue
            latencies.append(time.perf_counter() - started)

    async def probe():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while not done.is_set():
                started = time.perf_counter()
                try:
                    await client.get("/healthz")
                    health.append(time.perf_counter() - started)
                except httpx.HTTPError as exc:
                    errors.append(f"/healthz {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)

    async def load(client: httpx.AsyncClient):
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        done.set()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(load(client), probe())
        return {
            "latencies": latencies,
            "errors": errors,
            "shed": shed,
            "healthz": health,
            "wall": time.perf_counter() - started,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--run", required=True, help="a run directory with a tuned adapter")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override for the server"
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--with-history", type=float, default=0.25, help="fraction of requests with new behaviours")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--log", default="serve_load_server.log", help="the server's log file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port, Path(args.log).resolve())
    try:
        health = wait_healthy(url, server, args.start_timeout)
        log.info(
            "serving %s (%d users, %d items) on %s", health["model_version"], health["users"], health["items"], url
        )
        bodies = make_requests(
            args.warmup + args.requests, *catalogue_ids(args.run), args.candidates, args.with_history, args.seed
        )
        warm_errors = asyncio.run(send_all(url, bodies[: args.warmup], args.concurrency))["errors"]
        before = httpx.get(f"{url}/stats", timeout=30).json()
        log.info("sending %d requests x %d candidates, %d at a time", args.requests, args.candidates, args.concurrency)
        sent = asyncio.run(send_all(url, bodies[args.warmup :], args.concurrency))
        latencies, errors, wall = sent["latencies"], sent["errors"], sent["wall"]
        after = httpx.get(f"{url}/stats", timeout=30).json()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    for error in (warm_errors + errors)[:5]:
        log.warning("error: %s", error)
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    batches = after["batches"] - before["batches"]
    result = {
        "requests": args.requests,
        "candidates_per_request": args.candidates,
        "concurrency": args.concurrency,
        "rps": round(len(latencies) / wall, 3),
        "candidates_per_s": round(len(latencies) * args.candidates / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "errors": len(errors) + len(warm_errors),
        "wall_s": round(wall, 1),
        "shed": len(sent["shed"]),
        "shed_share": round(len(sent["shed"]) / args.requests, 4),
        "healthz_p99_ms": round(float(np.percentile(np.array(sent["healthz"] or [np.nan]) * 1000, 99)), 1),
        "mean_batch_requests": round((after["requests"] - before["requests"]) / batches, 2) if batches else 0.0,
        "batch_requests_histogram": {
            size: n - before["batch_requests_histogram"].get(size, 0)
            for size, n in after["batch_requests_histogram"].items()
            if n > before["batch_requests_histogram"].get(size, 0)
        },
        "torch_threads": after.get("torch_threads"),
        "model_version": health["model_version"],
        "config": args.config,
        "overrides": args.set,
    }
    print(
        f"{result['rps']:.2f} requests/s, {result['candidates_per_s']:.1f} candidates/s, "
        f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, {result['errors']} errors, "
        f"{result['shed']} shed (503, {100 * result['shed_share']:.1f}%), healthz p99 {result['healthz_p99_ms']:.0f} ms, "
        f"{result['mean_batch_requests']:.1f} requests per batch on average"
    )
    print(json.dumps(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

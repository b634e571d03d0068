"""`reclora serve`: online personalized scoring of a finished run with Ray Serve.

    reclora serve --config quickstart --run OUT [--set serve.port=8000 --set serve.variant=reclora]
    curl -s localhost:8000/score -d '{"user_id": 12, "candidates": [50, 172, 181]}'

serves OUT/adapter/<serve.variant> (with its CRM, the prepared data and the item embeddings of
OUT) on serve.host:serve.port (127.0.0.1 unless configured) until Ctrl-C or SIGTERM. The same
application for `serve run` / `serve deploy` (HTTP host and port then come from Serve's options):

    serve run reclora_ray.serve.app:build_app config=quickstart run=OUT [overrides="serve.max_batch_size=32;..."]

Replicas: serve.num_replicas fixed, or autoscaling between serve.min_replicas and
serve.max_replicas (at serve.target_ongoing_requests per replica) when max_replicas > min_replicas.
The endpoints are described in `reclora_ray.serve.service`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import time
from pathlib import Path

import pyarrow.parquet as pq
from ray import serve
from ray.serve import Application

from reclora_ray.config import Config, ConfigError, load_config
from reclora_ray.data.prepared import PreparedDataError
from reclora_ray.rundir import RunDir
from reclora_ray.runtime import config_from_args, init_ray
from reclora_ray.serve.online import model_version
from reclora_ray.variants import get_variant

log = logging.getLogger(__name__)

APP_NAME = "reclora"
# The ingress computes nothing and holds no model: many requests at once, no CPU reserved. The
# model deployment's limits (deployment_options) decide what is admitted, queued or shed.
INGRESS_OPTIONS = {
    "name": "RecLoRAService",
    "num_replicas": 1,
    "max_ongoing_requests": 1024,
    "ray_actor_options": {"num_cpus": 0},
}


def deployment_options(cfg: Config) -> dict:
    """The model deployment's (named after its class, ScoringModel, by which the ingress counts
    its replicas): the replicas, their resources and how many requests they admit."""
    s = cfg.serve
    options = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "health_check_period_s": s.health_check_period_s,
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    }
    if s.max_replicas > s.min_replicas:
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = s.num_replicas
    return options


def build(cfg: Config, out: str | Path) -> Application:
    """The Serve application for run directory `out`, after checking it holds what is served."""
    from reclora_ray.serve.service import RecLoRAService, ScoringModel

    run = RunDir(Path(out).resolve())
    variant = get_variant(cfg.serve.variant)
    if not (run.data / "meta.json").is_file():
        raise PreparedDataError(f"{run.data} holds no prepared dataset; run `reclora run --out {run.root}` first")
    if cfg.serve.max_ongoing_requests < cfg.serve.max_batch_size:
        log.warning(
            "serve.max_ongoing_requests=%d < serve.max_batch_size=%d: batches never fill",
            cfg.serve.max_ongoing_requests,
            cfg.serve.max_batch_size,
        )
    info = {
        "variant": variant.name,
        "model_version": model_version(cfg, run, variant),
        "users": pq.ParquetFile(run.data / "users.parquet").metadata.num_rows,
        "items": pq.ParquetFile(run.data / "items.parquet").metadata.num_rows,
    }
    model = ScoringModel.options(**deployment_options(cfg)).bind(cfg, str(run.root))
    return RecLoRAService.options(**INGRESS_OPTIONS).bind(cfg.serve, info, model)


def build_app(args: dict) -> Application:
    """`serve run reclora_ray.serve.app:build_app config=C run=OUT [overrides="k=v;k=v"]`."""
    unknown = set(args) - {"config", "run", "overrides"}
    if unknown or "run" not in args:
        raise ValueError(
            f"build_app takes config=<name or yaml>, run=<run dir> and optional overrides='k=v;k=v'; got {sorted(args)}"
        )
    overrides = args.get("overrides", [])
    if isinstance(overrides, str):
        overrides = [item for item in overrides.split(";") if item.strip()]
    return build(load_config(args.get("config", "quickstart"), overrides), args["run"])


def check_port_free(host: str, port: int) -> None:
    """One line naming serve.host:serve.port when it cannot be listened on, before Ray starts."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        problem = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be listened on ({exc.strerror})"
        raise ConfigError(f"serve.port: {host}:{port} {problem}; pick another with --set serve.port=N") from None


def start(cfg: Config, out: str | Path) -> str:
    """Start Ray (or connect), Serve on serve.host:serve.port, and the application; its URL."""
    check_port_free(cfg.serve.host, cfg.serve.port)
    app = build(cfg, out)
    init_ray(cfg)
    serve.start(
        http_options={"host": cfg.serve.host, "port": cfg.serve.port, "request_timeout_s": cfg.serve.request_timeout_s}
    )
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from reclora_ray.runtime import add_common_arguments

    add_common_arguments(parser, out_required=False)
    parser.add_argument("--run", help="the run directory to serve (same as --out)")


def main(args: argparse.Namespace) -> int:
    out = args.run or args.out
    if out is None:
        raise ValueError("reclora serve needs the run directory: --run OUT")
    cfg = config_from_args(args)
    url = start(cfg, out)
    log.info(
        "serving %s of %s on %s: POST /score, GET /users/{id}/adapter?item_id=, "
        "POST /users/{id}/adapter/export, GET /healthz, GET /stats (Ctrl-C stops)",
        cfg.serve.variant,
        out,
        url,
    )

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
    return 0

"""Process-level helpers every stage shares: its config, Ray start-up, the resolved config file."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path

from reclora_ray.config import Config, load_config
from reclora_ray.console import VERBOSE_ENV, is_verbose, quiet_ray

log = logging.getLogger(__name__)


def add_common_arguments(parser: argparse.ArgumentParser, out_required: bool = True) -> None:
    """Arguments every stage takes: the config, overrides and the run directory."""
    parser.add_argument("--config", default="quickstart", help="packaged config name or YAML path")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set crm.lr=1e-3 (repeatable)",
    )
    parser.add_argument(
        "--out", required=out_required, help="the run directory, a path or a URI (docs/architecture.md)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of another config")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def save_resolved_config(cfg: Config, directory: Path) -> Path:
    """Write the fully resolved config beside a stage's outputs, so a run says how it was made."""
    path = Path(directory) / "config.yaml"
    path.write_text(cfg.to_yaml())
    return path


def init_ray(cfg: Config) -> None:
    """Connect to the configured cluster (or RAY_ADDRESS), else start a local Ray once. Inside a
    Ray task (a sweep's experiment) Ray is up already: only this process's Ray Data is set."""
    import ray
    import ray.data

    if not ray.is_initialized():
        _start_ray(cfg)
    # Ray Data's progress bars where a terminal shows them; without one (a Ray worker's output
    # included) they are multi-line dumps, and the stages log their own one-line progress.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty() or is_verbose()


def _start_ray(cfg: Config) -> None:
    import ray

    quiet_ray()
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        # Our loggers in the workers, as on a local Ray (a job's own runtime env is kept: Ray merges).
        ray.init(
            address=address,
            log_to_driver=True,
            runtime_env={"worker_process_setup_hook": "reclora_ray.console.setup_worker_logging"},
        )
        quiet_ray()
    else:
        log.info("starting a local Ray (num_cpus=%s) on 127.0.0.1", cfg.run.num_cpus or "all")
        secure_local_ray()
        # Workers import the same reclora_ray as this driver, even from an uninstalled checkout.
        source_root = str(Path(__file__).resolve().parents[1])
        pythonpath = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)
        ray.init(
            num_cpus=cfg.run.num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={
                "env_vars": {"PYTHONPATH": pythonpath, VERBOSE_ENV: "1" if is_verbose() else "0"},
                "worker_process_setup_hook": "reclora_ray.console.setup_worker_logging",
            },
        )
        quiet_ray()


LOCAL_TOKEN_ENV = "RECLORA_RAY_TOKEN_FILE"  # default: ~/.config/reclora/ray_auth_token


def write_private_token(path: Path) -> Path:
    """A new random Ray auth token in `path`, readable by its owner only (0600)."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # the format `ray get-auth-token --generate` writes
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that was already there
    return path


def secure_local_ray() -> None:
    """Before a local ray.init: every Ray server binds 127.0.0.1, and token auth is on with a
    0600 token of our own (Ray would write a world-readable ~/.ray/auth_token).

    Ray takes the node IP, which its servers bind, from the machine's outward address unless
    it treats the machine as a single-node (laptop) setup; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    is that switch, read when ray is imported, so the imported constant is set too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return  # the user chose the auth mode or the token file
    path = Path(os.environ.get(LOCAL_TOKEN_ENV) or Path.home() / ".config" / "reclora" / "ray_auth_token")
    if not path.is_file() or path.stat().st_mode & 0o077:
        write_private_token(path)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(path))
    from ray._raylet import AuthenticationTokenLoader
    from ray._raylet import Config as RayletConfig

    RayletConfig.initialize("")  # Ray read RAY_AUTH_MODE when it was imported
    AuthenticationTokenLoader.instance().reset_cache()

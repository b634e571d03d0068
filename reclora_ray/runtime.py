"""Process-level helpers every stage shares: its config, Ray start-up, the resolved config file."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from reclora_ray.config import Config, load_config
from reclora_ray.console import VERBOSE_ENV, is_verbose, quiet_ray

log = logging.getLogger(__name__)


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def save_resolved_config(cfg: Config, directory: Path) -> Path:
    """Write the fully resolved config beside a stage's outputs, so a run says how it was made."""
    path = Path(directory) / "config.yaml"
    path.write_text(cfg.to_yaml())
    return path


def init_ray(cfg: Config) -> None:
    """Connect to the configured cluster (or RAY_ADDRESS), else start a local Ray once."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    quiet_ray()
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        quiet_ray()
    else:
        log.info("starting a local Ray (num_cpus=%s)", cfg.run.num_cpus or "all")
        # Workers import the same reclora_ray as this driver, even from an uninstalled checkout.
        source_root = str(Path(__file__).resolve().parents[1])
        pythonpath = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=cfg.run.num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath, VERBOSE_ENV: "1" if is_verbose() else "0"},
                              "worker_process_setup_hook": "reclora_ray.console.setup_worker_logging"})
        quiet_ray()
    # Ray Data's progress bars where a terminal shows them; without one they are multi-line
    # dumps, and the stages log their own one-line progress.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty() or is_verbose()

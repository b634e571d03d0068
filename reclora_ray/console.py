"""What a run prints: our own progress and results, warnings, one line per stage start and end.

Ray's own INFO chatter stays out of the console (it is still in the session's log files under
/tmp/ray/session_*/logs); `--verbose` brings it back. Worker output reaches the driver through
Ray's log forwarding; a filter there drops Ray's INFO/DEBUG records and known-harmless
warnings, and keeps everything else (our workers' lines, warnings, tracebacks, prints).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from typing import Iterator

VERBOSE_ENV = "RECLORA_VERBOSE"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
OURS = " reclora_ray."  # in every line our loggers write, on the driver and in workers
_ALERT = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Warning:|Error\b|Exception\b|Traceback \(most recent call last\)")
# A record in Ray's log format, e.g. "2026-12-02 06:31:20,286\tINFO tune.py:1007 -- Wrote ...".
_RAY_INFO = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|DEBUG) \S+:\d+ -- ")
# Output Ray repeats on local runs that says nothing about this run.
_NOISE = (
    "Failed to query Ray Train Controller actor state",  # no state API without the dashboard
    "Token authentication is enabled for this Ray cluster",
    "ExecutionOptions.exclude_resources` is deprecated",
    "self.exclude_resources = exclude_resources",
    "Progress bars disabled. To enable",  # Ray Data, where we turned them off on purpose
    "Setting accelerator to CPU",  # DeepSpeed on a CPU run
    "Attempting to get learning rate from scheduler before it has started",  # DeepSpeed, first micro-batches
    "all_gather_into_tensor` is deprecated",  # torch, inside DeepSpeed
    "Failed to kill actor",  # the GCS, about an actor that had already exited
)
# Ray actors whose own failures do not fail a run (the cleaner only tidies up after a dead controller).
_QUIET_ACTORS = ("PlacementGroupCleaner",)
PROGRESS_EVERY_S = 30.0  # one-line progress updates, at most this often,
PROGRESS_STEP = 0.2  # and once the loop is another fifth done,
PROGRESS_QUIET_S = 300.0  # or this long after the last line
REPEAT_WINDOW_S = 120.0  # one of our lines said again by another worker this soon is not shown again
_CLOCK = re.compile(r"^\d\d:\d\d:\d\d ")  # the time our FORMAT starts a line with


def setup_logging(verbose: bool = False) -> None:
    """Our loggers at INFO (DEBUG with --verbose); Ray's console output quiet unless verbose."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"  # init_ray reads it, possibly in another module's call
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, datefmt=DATEFMT)
    if not (sys.stdout.isatty() and sys.stderr.isatty()):  # a log file: no colour escapes in Ray's worker prefixes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not verbose:
        # Tune's new output engine prints an experiment banner even at verbose=0.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager"


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_ray() -> None:
    """On a driver, before and after ray.init: Ray's console handlers at WARNING without known
    noise (its file handlers keep every record), and the worker output it forwards filtered."""
    if is_verbose():
        return
    import ray.data  # noqa: F401 - configures the ray.data logger, whose console handler is quieted here
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(max(handler.level, logging.WARNING))
                if not any(isinstance(f, _NoiseFilter) for f in handler.filters):
                    handler.addFilter(_NoiseFilter())
    # Ray has no public hook to filter what it forwards from workers to the driver's console.
    with dispatcher._lock:
        dispatcher.handlers = [
            (n, h if getattr(h, "quiet", False) or n != "ray_print_logs" else _filtered(h))
            for n, h in dispatcher.handlers
        ]


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


def _filtered(handle):
    repeats = RepeatedLines()

    def emit(batch: dict) -> None:
        lines = repeats.first_time(worker_lines_to_show(batch["lines"], batch.get("actor_name") or ""))
        if lines:
            handle({**batch, "lines": lines})

    emit.quiet = True
    return emit


def worker_lines_to_show(lines: list[str], actor: str = "") -> list[str]:
    """Of a batch of forwarded worker output: our loggers' lines, and warnings, errors and whole
    tracebacks that are not known noise; Ray's INFO records, prints and progress dumps are dropped."""
    if any(actor.startswith(name) for name in _QUIET_ACTORS):
        return []
    shown, in_traceback = [], False
    for line in lines:
        if "Traceback (most recent call last)" in line:
            in_traceback = True
        keep = in_traceback or OURS in line or (_ALERT.search(line) and not _RAY_INFO.search(line))
        if in_traceback and line[:1] not in (" ", "\t") and "Traceback (most recent call last)" not in line:
            in_traceback = False  # the exception line ends it
        if keep and not any(noise in line for noise in _NOISE):
            shown.append(line)
    return shown


class RepeatedLines:
    """Drops our loggers' lines that a worker already printed within `window_s`, whatever their
    time: N workers loading the same model say the same thing N times. (Ray's own deduplication
    holds such lines back and prints them late, under the next stage, as "[repeated Nx]".)
    Warnings and tracebacks are always shown."""

    def __init__(self, window_s: float = REPEAT_WINDOW_S):
        self.window_s, self.seen = window_s, {}

    def first_time(self, lines: list[str]) -> list[str]:
        now = time.monotonic()
        self.seen = {text: at for text, at in self.seen.items() if now - at < self.window_s}
        shown = []
        for line in lines:
            text = _CLOCK.sub("", line, count=1)
            if OURS in line and not _ALERT.search(text):
                if text in self.seen:
                    continue
                self.seen[text] = now
            shown.append(line)
        return shown


def setup_worker_logging() -> None:
    """Ray's worker_process_setup_hook: our loggers print INFO in workers (forwarded to the
    driver) in the driver's format, whatever Ray set up for the root logger there."""
    logger = logging.getLogger("reclora_ray")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if is_verbose() else logging.INFO)
        logger.propagate = False


@contextmanager
def stage_line(log: logging.Logger, name: str) -> Iterator[None]:
    """`==> name` when a stage starts, `<== name: done in 12.3 s` (or `FAILED after`) when it ends."""
    started = time.perf_counter()
    log.info("==> %s", name)
    try:
        yield
    except BaseException as exc:
        # INFO: the error itself is reported once, by whoever handles it (the CLI's one line).
        log.info("<== %s: FAILED after %.1f s (%s)", name, time.perf_counter() - started, type(exc).__name__)
        raise
    log.info("<== %s: done in %.1f s", name, time.perf_counter() - started)


class Progress:
    """Rate and ETA of a long loop: a tqdm bar on a terminal; elsewhere (a log file, a Ray
    worker's output forwarded to the driver) one log line at most every `every_s` seconds, when
    another PROGRESS_STEP of the total is done (or `quiet_s` passed), and one at the end: an
    hour-long loop says about ten lines, not a hundred."""

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        total: int | None = None,
        unit: str = "steps",
        every_s: float = PROGRESS_EVERY_S,
        active: bool = True,
        quiet_s: float = PROGRESS_QUIET_S,
    ):
        self.log, self.what, self.total, self.unit, self.every_s, self.active = log, what, total, unit, every_s, active
        self.quiet_s = quiet_s
        self.done, self.started = 0, time.perf_counter()
        self.last, self.last_done = self.started, 0
        self.warm = None  # (time, done) at the first update: the rate leaves out a pipeline's warm-up
        self.bar = None
        if active and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit.rstrip("s") or unit, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **extra: float) -> None:
        self.done += n
        now = time.perf_counter()
        if self.warm is None:
            self.warm, self.last = (now, self.done), now
        if self.bar is not None:
            self.bar.update(n)
            if extra:
                self.bar.set_postfix({k: f"{v:.4f}" for k, v in extra.items()}, refresh=False)
        elif self.active and self._due(now):
            self.last, self.last_done = now, self.done
            self.log.info("%s", self.line(now, extra))

    def _due(self, now: float) -> bool:
        if now - self.last < self.every_s:
            return False
        if self.total is None:
            return True
        if self.done >= self.total:
            return False  # the last unit's line is close()'s
        return self.done - self.last_done >= PROGRESS_STEP * self.total or now - self.last >= self.quiet_s

    def close(self, **extra: float) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.active and self.done:
            self.log.info("%s", self.line(time.perf_counter(), extra))

    def line(self, now: float, extra: dict) -> str:
        warm_at, warm_done = self.warm or (self.started, 0)
        if warm_done < self.done < 2 * warm_done:  # the first update held most of the work: its wait counts
            warm_at, warm_done = self.started, 0
        rate = (self.done - warm_done) / (now - warm_at) if now > warm_at and self.done > warm_done else None
        parts = [f"{self.what}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(
            f"{rate:,.{0 if rate >= 100 else 1}f} {self.unit}/s" if rate is not None else f"{now - self.started:.0f} s"
        )
        if self.total and rate and self.done < self.total:
            parts.append(f"ETA {(self.total - self.done) / rate:.0f} s")
        parts += [f"{k} {_number(v)}" for k, v in extra.items()]
        return ", ".join(parts)


def _number(value: float) -> str:
    """4 decimals, or 3 significant digits where those would hide the value (a learning rate of 2e-05)."""
    if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.2e}"

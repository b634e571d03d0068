"""The run directory every stage shares, and all-or-nothing stage outputs.

A stage writes into a hidden temporary sibling of its output directory and renames it into
place only when everything is written, with a `_SUCCESS.json` marker holding the fingerprint
(hash of the config sections the stage depends on). A re-run with the same fingerprint is a
no-op; a different fingerprint refuses unless `overwrite=True`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

MARKER = "_SUCCESS.json"


class StageOutputExists(RuntimeError):
    """The output directory holds a finished stage for a different config."""


class RunDir:
    """Paths of one run directory (DESIGN.md, 'The run directory')."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def retrieval(self) -> Path:
        return self.root / "data" / "retrieval"

    def crm(self, model: str) -> Path:
        return self.root / "crm" / model

    def adapter(self, variant: str) -> Path:
        return self.root / "adapter" / variant

    def scores(self, name: str) -> Path:
        return self.root / "scores" / name

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def read_marker(path: Path) -> dict | None:
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None


def is_done(path: Path, fingerprint: str) -> bool:
    marker = read_marker(path)
    return marker is not None and marker.get("fingerprint") == fingerprint


def check_can_write(path: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when the stage must run; False when it is already done for this fingerprint."""
    path = Path(path)
    marker = read_marker(path)
    if marker is not None and marker.get("fingerprint") == fingerprint and not overwrite:
        log.info("%s is up to date (fingerprint %s); skipping", path, fingerprint)
        return False
    if path.exists() and not overwrite:
        what = (
            f"was written by a different config (fingerprint {marker.get('fingerprint')}, now {fingerprint})"
            if marker
            else "exists but holds no finished stage output"
        )
        raise StageOutputExists(f"{path} {what}; pass --overwrite to replace it")
    return True


@contextmanager
def staged_output(path: Path, fingerprint: str, extra: dict | None = None) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` atomically, else it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        marker = {"fingerprint": fingerprint, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        marker.update(extra or {})
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        if path.exists():
            trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(trash)
            tmp.rename(path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False))
    tmp.replace(path)

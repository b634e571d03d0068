"""The run directory every stage shares, and all-or-nothing stage outputs.

A stage writes into a hidden temporary sibling of its output directory and renames it into
place only when everything is written, with a `_SUCCESS.json` marker holding the fingerprint
and the output's identity. A re-run with the same fingerprint is a no-op; a different
fingerprint refuses unless `overwrite=True`.

A stage's fingerprint is `with_inputs(own, upstream, files)`: its own config sections, the
identities of the upstream outputs it reads and the size and mtime of the raw files it reads.
An identity is the fingerprint plus a token new at every write, so re-running an upstream stage
(even with the same config: a retrained CRM has other weights) invalidates everything below it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

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


def new_marker(fingerprint: str, extra: dict | None = None) -> dict:
    """The marker of an output finished now: `identity` is unique to this write."""
    marker = {"fingerprint": fingerprint, "identity": f"{fingerprint}.{uuid.uuid4().hex[:8]}",
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    marker.update(extra or {})
    return marker


def identity(path: Path) -> str | None:
    """Which write of a finished output this is; None when nothing finished is there."""
    marker = read_marker(path)
    if marker is None:
        return None
    return marker.get("identity") or marker.get("fingerprint")  # markers from before identities


def with_inputs(own: str, upstream: Iterable[Path] = (), files: Iterable[Path] = ()) -> str:
    """A stage's fingerprint: `own` (its config sections) + the identities of the upstream
    outputs it reads + name, size and mtime of the raw files it reads."""
    payload = {"upstream": [identity(Path(p)) for p in upstream], "files": []}
    for f in files:
        stat = Path(f).stat()
        payload["files"].append([Path(f).name, stat.st_size, stat.st_mtime_ns])
    return f"{own}.{hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:8]}"


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
        (tmp / MARKER).write_text(json.dumps(new_marker(fingerprint, extra), indent=2))
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

"""The run directory every stage shares: its paths, and all-or-nothing stage outputs.

One module owns the layout (docs/architecture.md, "The run directory") and the protocol every
stage output follows, at a local path and at a URI (s3://, gs://, file://, ...) alike:

- A stage writes into a temporary directory. At a local path it is a hidden sibling of the
  output, renamed into place when everything is written; at a URI it is a local scratch
  directory uploaded file by file (`publish`), the `_SUCCESS.json` marker last, since an object
  store has no rename. The marker (fingerprint, identity, recipe) is what makes an output count
  as finished: a half-written or half-uploaded directory never does.
- A re-run with the same fingerprint is a no-op; another fingerprint refuses unless
  `overwrite=True`.
- A fingerprint is `with_inputs(own, upstream, files)`: a hash of the config values the stage's
  result depends on (`Config.fingerprint_payload`, composed from the stage table in
  reclora_ray/stages.py), the identities of the upstream outputs it reads and the size and mtime
  of the raw files it reads. An identity is the fingerprint plus a token new at every write, so
  re-running an upstream stage (even with the same config: a retrained CRM has other weights)
  invalidates everything built on it.

Stages read and write local files; for a URI run directory they run under `local_run_dir`,
which stages the parts they read into a scratch directory and publishes what they finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow.fs as pafs

from reclora_ray import storage

log = logging.getLogger(__name__)

MARKER = "_SUCCESS.json"
# 2: one recipe for every stage, execution-only config fields left out (markers written before
# it carry no "recipe"; `check_can_write` carries them over when their config still matches).
RECIPE = 2
SCRATCH_ENV = "RECLORA_SCRATCH"  # where stages with a URI --out stage their run directory
NEXT_ITEM = "next-item"  # the next-item task's own outputs, under OUT/next-item/


class StageOutputExists(RuntimeError):
    """The output directory holds a finished stage for a different config."""


class RunDir:
    """Every path of one (local) run directory. Plain data: Ray workers get the object itself."""

    def __init__(self, root: str | Path):
        root = str(root)
        if storage.is_uri(root):
            raise ValueError(f"{root}: a RunDir is local; run the stage under rundir.local_run_dir")
        self.root = Path(root)

    @classmethod
    def of(cls, run: "RunDir | str | Path") -> "RunDir":
        return run if isinstance(run, RunDir) else cls(run)

    def resolved(self) -> "RunDir":
        """The same run directory by absolute path (what workers in other directories receive)."""
        return RunDir(self.root.resolve())

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and self.root == other.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def retrieval(self) -> Path:
        return self.root / "retrieval"

    @property
    def legacy_retrieval(self) -> Path:
        """Where retrieval lived before it was a top-level output (inside prepare's)."""
        return self.data / "retrieval"

    def crm(self, model: str) -> Path:
        return self.root / "crm" / model

    def adapter(self, variant: str) -> Path:
        return self.root / "adapter" / variant

    def scores(self, name: str) -> Path:
        return self.root / "scores" / name

    def next_item_adapter(self, variant: str) -> Path:
        return self.root / NEXT_ITEM / "adapter" / variant

    def next_item_scores(self, name: str) -> Path:
        return self.root / NEXT_ITEM / "scores" / name

    @property
    def next_item(self) -> Path:
        return self.root / NEXT_ITEM

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def tracking(self) -> Path:
        return self.root / "tracking"

    def train_storage(self, output: Path) -> Path:
        """Ray Train's checkpoints while `output` trains, beside it; kept until it is written, so
        re-running the same command after a crash resumes there."""
        return (output.parent / f".ray-train-{output.name}").resolve()

    def upgrade(self) -> None:
        """Bring a run directory written before retrieval was a top-level output up to date:
        OUT/data/retrieval moves to OUT/retrieval (a rename; the marker and identity are kept)."""
        old, new = self.legacy_retrieval, self.retrieval
        if read_marker(old) is not None and not new.exists():
            old.rename(new)
            log.info("moved %s to %s (the run-directory layout since retrieval is a stage output of its own)", old, new)


# --------------------------------------------------------------------------- markers


def read_marker(location: str | Path) -> dict | None:
    """The marker of a finished output at a local path or URI; None when nothing finished is there."""
    path = storage.join(location, MARKER) if storage.is_uri(location) else Path(location) / MARKER
    try:
        text = (
            path.read_text() if isinstance(path, Path) else (storage.read_text(path) if storage.exists(path) else None)
        )
    except (FileNotFoundError, NotADirectoryError):
        return None
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def new_marker(fingerprint: str, extra: dict | None = None) -> dict:
    """The marker of an output finished now: `identity` is unique to this write."""
    marker = {
        "fingerprint": fingerprint,
        "identity": f"{fingerprint}.{uuid.uuid4().hex[:8]}",
        "recipe": RECIPE,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    marker.update(extra or {})
    return marker


def identity(location: str | Path) -> str | None:
    """Which write of a finished output this is; None when nothing finished is there."""
    marker = read_marker(location)
    if marker is None:
        return None
    return marker.get("identity") or marker.get("fingerprint")  # markers from before identities


def inputs_hash(upstream: Iterable[str | Path] = (), files: Iterable[Path] = ()) -> str:
    """The identities of the upstream outputs + name, size and mtime of the raw files, hashed."""
    payload = {"upstream": [identity(p) for p in upstream], "files": []}
    for f in files:
        stat = Path(f).stat()
        payload["files"].append([Path(f).name, stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:8]


def with_inputs(own: str, upstream: Iterable[str | Path] = (), files: Iterable[Path] = ()) -> str:
    """A stage's fingerprint: `own` (its config values) + what it read (`inputs_hash`)."""
    return f"{own}.{inputs_hash(upstream, files)}"


def is_done(location: str | Path, fingerprint: str) -> bool:
    marker = read_marker(location)
    return marker is not None and marker.get("fingerprint") == fingerprint


def _exists(location: str | Path) -> bool:
    return storage.exists(location) if storage.is_uri(location) else Path(location).exists()


def check_can_write(
    location: str | Path, fingerprint: str, overwrite: bool, carries_over: Callable[[dict], bool] | None = None
) -> bool:
    """True when the stage must run; False when it is already done for this fingerprint.

    `carries_over(marker)`: for an output written under an older fingerprint recipe, whether it
    is still valid for this config and these inputs; it then gets this fingerprint (its identity
    kept, so what was built on it stays valid) instead of being refused."""
    marker = read_marker(location)
    if marker is not None and marker.get("fingerprint") == fingerprint and not overwrite:
        log.info("%s is up to date (fingerprint %s); skipping", location, fingerprint)
        return False
    if (
        marker is not None
        and not overwrite
        and marker.get("recipe") is None
        and carries_over is not None
        and carries_over(marker)
    ):
        restamp(location, marker, fingerprint)
        log.info(
            "%s: written by an older reclora for this config; carried over (fingerprint %s)", location, fingerprint
        )
        return False
    if _exists(location) and not overwrite:
        if marker is None:
            what = "exists but holds no finished stage output"
        elif marker.get("recipe") is None:
            what = (
                f"was written by an older reclora (before fingerprint recipe {RECIPE}) for another config or "
                "other upstream outputs"
            )
        else:
            what = f"was written by a different config (fingerprint {marker.get('fingerprint')}, now {fingerprint})"
        raise StageOutputExists(
            f"{location} {what}; pass --overwrite to replace it"
            + (f" (or delete {location} to rebuild only this output)" if marker else "")
        )
    return True


def restamp(location: str | Path, marker: dict, fingerprint: str) -> None:
    """Give a finished output a new fingerprint, keeping its identity."""
    new = {**marker, "fingerprint": fingerprint, "recipe": RECIPE, "carried_over_from": marker.get("fingerprint")}
    new.setdefault("identity", marker.get("fingerprint"))
    storage.write_text(storage.join(location, MARKER), json.dumps(new, indent=2))


@contextmanager
def staged_output(location: str | Path, fingerprint: str, extra: dict | None = None) -> Iterator[Path]:
    """Yield a local directory to write into; on success it becomes `location` (a local path or a
    URI) with its marker, else nothing does. Call `check_can_write` first: what is at `location`
    is replaced."""
    if storage.is_uri(location):
        with tempfile.TemporaryDirectory(prefix="reclora-stage-") as scratch:
            local = Path(scratch) / "out"
            local.mkdir()
            yield local
            (local / MARKER).write_text(json.dumps(new_marker(fingerprint, extra), indent=2))
            publish(local, str(location))
        return
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps(new_marker(fingerprint, extra), indent=2))
        if path.exists() or path.is_symlink():
            trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(trash)
            tmp.rename(path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """One JSON file, replaced atomically (storage.write_text), at a local path or URI."""
    storage.write_text(path, json.dumps(payload, indent=2, sort_keys=False))


# --------------------------------------------------------------------------- URIs


def publish(local_dir: Path, location: str) -> None:
    """Copy a finished local stage output (markers included) to `location`, replacing what is
    there. The old marker goes first, so a half-replaced output never counts as finished; the
    new markers go last, nested ones before the top one."""
    fs, path = storage.filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        if fs.get_file_info(storage.join(path, MARKER)).type == pafs.FileType.File:
            fs.delete_file(storage.join(path, MARKER))
        fs.delete_dir(path)
    log.info("uploading %s to %s", local_dir, location)
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    markers = sorted((p for p in files if p.name == MARKER), key=lambda p: -len(p.parts))
    storage.upload_files(local_dir, location, [p for p in files if p.name != MARKER] + markers)


def finished_outputs(location: str) -> dict[str, str]:
    """{relative dir: marker text} of every finished stage output under `location`."""
    fs, root = storage.filesystem(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return {}
    markers = [
        f
        for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if f.type == pafs.FileType.File and f.base_name == MARKER
    ]
    out = {}
    for info in markers:
        with fs.open_input_stream(info.path) as f:
            out[info.path[len(root) :].strip("/").removesuffix(MARKER).rstrip("/")] = f.read().decode()
    return out


@contextmanager
def local_run_dir(out: str | Path, inputs: list[str], scratch: str | None = None) -> Iterator[Path]:
    """A local run directory standing for `out`, for stages that read and write local files.

    A local path is used as it is. For a URI, a scratch directory (under `scratch`, else
    $RECLORA_SCRATCH, else the system temp dir) gets the `inputs` (run-directory parts such as
    "data"; "" = everything) and the marker of every other finished output, so the stage skips
    what is done and refuses to replace another config's output as it would locally. On exit,
    each output whose marker is new or changed is published back to `out`, then the new or
    changed files at the top of the run directory (report.md, metrics.json, config.yaml, plots).
    Outputs finished before a failure are published too (a pipeline re-run resumes from them);
    the failure is raised after. On a multi-node cluster, Ray tasks of the stage read and write
    the scratch directory: put it on a filesystem every node mounts.
    """
    if not storage.is_uri(out):
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="reclora-run-", dir=scratch or os.environ.get(SCRATCH_ENV)) as tmp:
        local = Path(tmp)
        for part in inputs:
            storage.download(storage.join(out, part), local / part)
        before = finished_outputs(str(out))
        for rel, text in before.items():
            marker = storage.confined(local, rel, str(out)) / MARKER
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(text)
        top_before = _top_files(local)
        try:
            yield local
        finally:
            changed = [rel for rel in _local_outputs(local) if before.get(rel) != (local / rel / MARKER).read_text()]
            for rel in changed:  # an output inside another changed one goes up with it
                if not any(_inside(rel, parent) for parent in changed):
                    publish(local / rel, storage.join(out, rel))
            for name, content in _top_files(local).items():
                if top_before.get(name) != content:
                    storage.write_bytes(storage.join(out, name), content)


def _top_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file() and not p.name.startswith(".")}


def _local_outputs(root: Path) -> list[str]:
    rels = (marker.parent.relative_to(root).as_posix() for marker in root.rglob(MARKER))
    return sorted("" if rel == "." else rel for rel in rels)


def _inside(rel: str, parent: str) -> bool:
    return rel != parent and (parent == "" or rel.startswith(parent + "/"))

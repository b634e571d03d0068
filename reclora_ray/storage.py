"""Stage outputs at any pyarrow-supported URI: a local path, file://, s3://, gs://, hdfs://, ...

On a cluster the run directory must be storage every node sees: a shared filesystem path or an
object store. A stage still writes its output into a local temporary directory; what happens
when it succeeds depends on where the output goes:

- a plain local path: `rundir.staged_output` renames the directory into place (atomic);
- a URI (`scheme://...`, file:// included): the directory is uploaded with
  `pyarrow.fs.copy_files`, and the `_SUCCESS.json` marker goes up last, after every other file.
  Object stores have no rename, so the marker is what makes an output count as finished:
  `is_done` and `check_can_write` read it through `pyarrow.fs`, and a half-uploaded directory
  (no marker) is never taken for a finished one.

Stages that only know local paths run under `local_run_dir(out, inputs)`: for a URI, their
inputs are downloaded to a scratch directory, they run there, and the outputs they finish are
published back (`publish`: markers last). The jobs in jobs/ do this for their --out.

Credentials come from the usual places of each filesystem (AWS_* / instance roles for s3://,
GOOGLE_APPLICATION_CREDENTIALS / workload identity for gs://).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from reclora_ray import rundir
from reclora_ray.rundir import MARKER, StageOutputExists

log = logging.getLogger(__name__)

SCRATCH_ENV = "RECLORA_SCRATCH"  # where stages with a URI --out stage their run directory


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(location: str | Path, *parts: str) -> str:
    """`location/part/...` for a local path or a URI alike."""
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding `location` and the path inside it."""
    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(str(location))
        except (ValueError, OSError) as exc:  # unknown scheme, bad bucket name, missing driver
            raise ValueError(f"output location {location}: {exc}") from exc
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def exists(location: str | Path) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str | Path) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str | Path, text: str) -> None:
    """Write one small file; local files are replaced atomically, object-store puts are atomic."""
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_marker(location: str | Path) -> dict | None:
    marker = join(location, MARKER)
    if not exists(marker):
        return None
    try:
        return json.loads(read_text(marker))
    except json.JSONDecodeError:
        return None


def is_done(location: str | Path, fingerprint: str) -> bool:
    marker = read_marker(location)
    return marker is not None and marker.get("fingerprint") == fingerprint


def check_can_write(location: str | Path, fingerprint: str, overwrite: bool) -> bool:
    """`rundir.check_can_write` for any location: True = run the stage, False = already done."""
    marker = read_marker(location)
    if marker is not None and marker.get("fingerprint") == fingerprint and not overwrite:
        log.info("%s is up to date (fingerprint %s); skipping", location, fingerprint)
        return False
    if exists(location) and not overwrite:
        what = (
            f"was written by a different config (fingerprint {marker.get('fingerprint')}, now {fingerprint})"
            if marker
            else "exists but holds no finished stage output"
        )
        raise StageOutputExists(f"{location} {what}; pass --overwrite to replace it")
    return True


@contextmanager
def staged_output(location: str | Path, fingerprint: str, extra: dict | None = None) -> Iterator[Path]:
    """Yield a local directory to write into; on success it becomes `location`, else nothing does.

    Call `check_can_write` first: an existing output at `location` is replaced.
    """
    if not is_uri(location):
        with rundir.staged_output(Path(location), fingerprint, extra) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="reclora-stage-") as scratch:
        local = Path(scratch) / "out"
        local.mkdir()
        yield local
        upload(local, location, fingerprint, extra)


def upload(local_dir: Path, location: str, fingerprint: str, extra: dict | None = None) -> None:
    """Mark a finished local directory with its fingerprint and publish it at `location`."""
    (Path(local_dir) / MARKER).write_text(json.dumps(rundir.new_marker(fingerprint, extra), indent=2))
    publish(local_dir, location)


def publish(local_dir: Path, location: str) -> None:
    """Copy a finished local stage output (markers included) to `location`, replacing what is
    there. The old marker goes first, so a half-replaced output never counts as finished; the
    new markers go last, nested ones before the top one."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        if fs.get_file_info(join(path, MARKER)).type == pafs.FileType.File:
            fs.delete_file(join(path, MARKER))
        fs.delete_dir(path)
    log.info("uploading %s to %s", local_dir, location)
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    markers = sorted((p for p in files if p.name == MARKER), key=lambda p: -len(p.parts))
    for file in [p for p in files if p.name != MARKER] + markers:
        target = join(path, file.relative_to(local_dir).as_posix())
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(file), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(location: str, local_dir: Path) -> bool:
    """Copy the directory at `location` into `local_dir`; False when there is nothing there."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    local_dir.mkdir(parents=True, exist_ok=True)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File:
            target = confined(local_dir, info.path[len(path):].strip("/"), location)
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return True


def confined(local_dir: Path, key: str, location: str) -> Path:
    """local_dir/key, refusing a remote key (an object store keeps '..' as it is) that leaves it."""
    root = Path(local_dir).resolve()
    target = (root / key).resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"{location}: remote key {key!r} points outside the scratch folder {root}; refusing it")
    return target


def finished_outputs(location: str) -> dict[str, str]:
    """{relative dir: marker text} of every finished stage output under `location`."""
    fs, root = filesystem(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return {}
    markers = [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
               if f.type == pafs.FileType.File and f.base_name == MARKER]
    out = {}
    for info in markers:
        with fs.open_input_stream(info.path) as f:
            out[info.path[len(root):].strip("/").removesuffix(MARKER).rstrip("/")] = f.read().decode()
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
    if not is_uri(out):
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="reclora-run-", dir=scratch or os.environ.get(SCRATCH_ENV)) as tmp:
        local = Path(tmp)
        for part in inputs:
            download(join(out, part), local / part)
        before = finished_outputs(str(out))
        for rel, text in before.items():
            marker = confined(local, rel, str(out)) / MARKER
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
                    publish(local / rel, join(out, rel))
            fs, root = filesystem(out)
            for name, content in _top_files(local).items():
                if top_before.get(name) != content:
                    fs.create_dir(root, recursive=True)
                    with fs.open_output_stream(join(root, name)) as f:
                        f.write(content)


def _top_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file() and not p.name.startswith(".")}


def _local_outputs(root: Path) -> list[str]:
    rels = (marker.parent.relative_to(root).as_posix() for marker in root.rglob(MARKER))
    return sorted("" if rel == "." else rel for rel in rels)


def _inside(rel: str, parent: str) -> bool:
    return rel != parent and (parent == "" or rel.startswith(parent + "/"))

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

Credentials come from the usual places of each filesystem (AWS_* / instance roles for s3://,
GOOGLE_APPLICATION_CREDENTIALS / workload identity for gs://).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from reclora_ray import rundir
from reclora_ray.rundir import MARKER, StageOutputExists

log = logging.getLogger(__name__)


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
    """Copy a finished local directory to `location`, replacing what is there, marker last."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:  # an old output, being replaced:
        if fs.get_file_info(join(path, MARKER)).type == pafs.FileType.File:
            fs.delete_file(join(path, MARKER))  # first, so it stops counting as finished
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    log.info("uploading %s to %s", local_dir, location)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    marker = {"fingerprint": fingerprint, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    marker.update(extra or {})
    write_text(join(location, MARKER), json.dumps(marker, indent=2))

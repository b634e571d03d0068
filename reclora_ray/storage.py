"""Files at any pyarrow-supported location: a local path, file://, s3://, gs://, hdfs://, ...

The primitives under the run directory (reclora_ray/rundir.py owns the stage-output protocol:
markers, staged writes, publishing a finished output to a URI markers last, `local_run_dir`).
On a cluster the run directory must be storage every node sees: a shared filesystem path or an
object store.

Credentials come from the usual places of each filesystem (AWS_* / instance roles for s3://,
GOOGLE_APPLICATION_CREDENTIALS / workload identity for gs://).
"""

from __future__ import annotations

import importlib.util
import logging
import uuid
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger(__name__)


def package_dir(module: str, missing: str) -> Path:
    """The folder of an installed package, found without importing it (the data and model packages
    import heavy or absent dependencies); FileNotFoundError with `missing` when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(missing)
    return Path(list(spec.submodule_search_locations)[0])


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
    """Write one small file: the project's one atomic write. A local file is replaced atomically
    (a unique temporary sibling, then a rename); an object-store put is atomic."""
    write_bytes(location, text.encode())


def write_bytes(location: str | Path, content: bytes) -> None:
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(content)
        tmp.replace(path)
        return
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(content)


def upload_files(local_dir: Path, location: str, files: list[Path]) -> None:
    """Copy `files` (under local_dir) to the same relative paths under `location`, in order."""
    fs, path = filesystem(location)
    for file in files:
        target = join(path, Path(file).relative_to(local_dir).as_posix())
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
            target = confined(local_dir, info.path[len(path) :].strip("/"), location)
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

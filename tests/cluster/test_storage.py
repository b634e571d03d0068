"""Stage outputs (rundir) and files (storage) at a local path and at a URI (file:// exercises the upload path that s3:// and
gs:// take; no object-store emulator is installed here, so those schemes are not run)."""

import json

import pytest

from reclora_ray import rundir, storage
from reclora_ray.rundir import MARKER, StageOutputExists


@pytest.fixture(params=["path", "uri"])
def location(request, tmp_path):
    target = tmp_path / "run" / "crm" / "sim"
    return str(target) if request.param == "path" else f"file://{target}"


def local(location: str):
    from pathlib import Path

    return Path(location.removeprefix("file://"))


def test_staged_output_publishes_everything_then_counts_as_done(location):
    assert rundir.check_can_write(location, "fp1", overwrite=False)
    with rundir.staged_output(location, "fp1", extra={"model": "sim"}) as tmp:
        (tmp / "weights.bin").write_bytes(b"\x00" * 10)
        (tmp / "nested").mkdir()
        (tmp / "nested" / "metrics.json").write_text('{"auc": 0.8}')
    out = local(location)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        MARKER,
        "nested/metrics.json",
        "weights.bin",
    ]
    assert rundir.is_done(location, "fp1") and not rundir.is_done(location, "fp2")
    assert rundir.read_marker(location)["model"] == "sim"
    assert rundir.check_can_write(location, "fp1", overwrite=False) is False
    with pytest.raises(StageOutputExists, match="different config"):
        rundir.check_can_write(location, "fp2", overwrite=False)


def test_failed_stage_leaves_nothing(location):
    with pytest.raises(RuntimeError, match="boom"):
        with rundir.staged_output(location, "fp1") as tmp:
            (tmp / "half.bin").write_bytes(b"\x01")
            raise RuntimeError("boom")
    assert not storage.exists(location)
    assert not rundir.is_done(location, "fp1")


def test_overwrite_replaces_the_old_output_entirely(location):
    with rundir.staged_output(location, "fp1") as tmp:
        (tmp / "old.bin").write_bytes(b"old")
    assert rundir.check_can_write(location, "fp2", overwrite=True)
    with rundir.staged_output(location, "fp2") as tmp:
        (tmp / "new.bin").write_bytes(b"new")
    out = local(location)
    assert not (out / "old.bin").exists() and (out / "new.bin").read_bytes() == b"new"
    assert rundir.is_done(location, "fp2")


def test_directory_without_marker_is_not_finished(tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    (half / "part-0.parquet").write_bytes(b"x")  # e.g. an upload cut short before the marker
    uri = f"file://{half}"
    assert not rundir.is_done(uri, "fp1")
    with pytest.raises(StageOutputExists, match="holds no finished stage output"):
        rundir.check_can_write(uri, "fp1", overwrite=False)


def test_small_files_and_joins(tmp_path):
    uri = storage.join(f"file://{tmp_path}/", "a", "/b.json")
    assert uri == f"file://{tmp_path}/a/b.json"
    storage.write_text(uri, json.dumps({"x": 1}))
    assert json.loads(storage.read_text(uri)) == {"x": 1}
    storage.write_text(str(tmp_path / "c" / "d.txt"), "hi")
    assert storage.read_text(str(tmp_path / "c" / "d.txt")) == "hi"
    assert storage.exists(uri) and not storage.exists(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        storage.read_text(str(tmp_path / "nope"))


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="output location nosuch://bucket/x"):
        storage.exists("nosuch://bucket/x")


def test_remote_keys_with_dotdot_stay_inside_the_scratch_folder(tmp_path, monkeypatch):
    """An object store keeps '../' in a key as it is; a marker or file under such a key must
    not be written outside the scratch run directory (issue 21, finding 6)."""
    import pyarrow.fs as pafs

    store = pafs._MockFileSystem()  # keeps keys literally, as S3 and GCS do

    def put(key: str, text: str):
        store.create_dir(key.rsplit("/", 1)[0], recursive=True)
        with store.open_output_stream(key) as f:
            f.write(text.encode())

    monkeypatch.setattr(storage, "filesystem", lambda location: (store, location.removeprefix("mock://")))
    put("bucket/run/crm/sim/_SUCCESS.json", json.dumps({"fingerprint": "fp"}))
    put("bucket/run/../../escaped/_SUCCESS.json", json.dumps({"fingerprint": "evil"}))
    scratch = tmp_path / "scratch" / "deep" / "er"
    scratch.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"remote key '\.\./\.\./escaped' points outside the scratch folder"):
        with rundir.local_run_dir("mock://bucket/run", inputs=[], scratch=str(scratch)):
            pass
    assert not list(tmp_path.rglob("escaped"))

    store.delete_dir("bucket/run/../../escaped")
    put("bucket/run/data/../../../../oops.txt", "x")
    with pytest.raises(ValueError, match=r"run/data: remote key '(\.\./){4}oops\.txt' points outside"):
        with rundir.local_run_dir("mock://bucket/run", inputs=["data"], scratch=str(scratch)):
            pass
    assert not list(tmp_path.rglob("oops.txt"))


def test_local_run_dir_publishes_outputs_finished_before_a_failure_and_top_level_files(tmp_path):
    bucket = tmp_path / "bucket"
    uri = f"file://{bucket}"
    with pytest.raises(RuntimeError, match="stage 2 failed"):
        with rundir.local_run_dir(uri, inputs=[""], scratch=str(tmp_path)) as local:
            with rundir.staged_output(local / "data", "fp-data") as tmp:
                (tmp / "part-0.parquet").write_bytes(b"rows")
            (local / "config.yaml").write_text("run: {}\n")
            (local / "scores").mkdir()
            (local / "scores" / "half.parquet").write_bytes(b"x")  # no marker: never published
            raise RuntimeError("stage 2 failed")
    assert rundir.is_done(storage.join(uri, "data"), "fp-data")
    assert (bucket / "data" / "part-0.parquet").read_bytes() == b"rows"
    assert (bucket / "config.yaml").read_text() == "run: {}\n"
    assert not (bucket / "scores").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bucket"]  # the scratch directory is gone

    # A re-run downloads what is there; only what it changes goes up again.
    stamp = (bucket / "data" / "part-0.parquet").stat().st_mtime_ns
    with rundir.local_run_dir(uri, inputs=[""], scratch=str(tmp_path)) as local:
        assert rundir.is_done(local / "data", "fp-data")
        (local / "report.md").write_text("# report\n")
    assert (bucket / "report.md").read_text() == "# report\n"
    assert (bucket / "data" / "part-0.parquet").stat().st_mtime_ns == stamp

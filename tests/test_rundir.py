import pytest

from reclora_ray.rundir import MARKER, StageOutputExists, check_can_write, is_done, staged_output


def test_staged_output_is_all_or_nothing(tmp_path):
    final = tmp_path / "stage"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(final, "fp1") as tmp:
            (tmp / "part.parquet").write_text("half")
            raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []  # no temp dir left behind

    with staged_output(final, "fp1") as tmp:
        (tmp / "part.parquet").write_text("whole")
    assert (final / "part.parquet").read_text() == "whole"
    assert (final / MARKER).exists() and is_done(final, "fp1")


def test_rerun_is_noop_other_config_refuses_unless_overwrite(tmp_path):
    final = tmp_path / "stage"
    assert check_can_write(final, "fp1", overwrite=False)
    with staged_output(final, "fp1") as tmp:
        (tmp / "a").write_text("1")
    assert check_can_write(final, "fp1", overwrite=False) is False
    with pytest.raises(StageOutputExists, match="different config.*--overwrite"):
        check_can_write(final, "fp2", overwrite=False)
    assert check_can_write(final, "fp2", overwrite=True)
    with staged_output(final, "fp2") as tmp:
        (tmp / "b").write_text("2")
    assert is_done(final, "fp2") and not (final / "a").exists()


def test_unfinished_directory_is_not_taken_for_done(tmp_path):
    final = tmp_path / "stage"
    final.mkdir()
    (final / "junk").write_text("x")
    with pytest.raises(StageOutputExists, match="holds no finished stage output"):
        check_can_write(final, "fp1", overwrite=False)


def test_fingerprint_with_inputs_follows_upstream_writes_and_raw_files(tmp_path):
    from reclora_ray.rundir import identity, with_inputs

    upstream, raw = tmp_path / "crm", tmp_path / "ratings.dat"
    raw.write_text("1::2::5::978300760\n")
    assert identity(upstream) is None
    missing = with_inputs("own", [upstream], [raw])
    with staged_output(upstream, "crm-fp") as tmp:
        (tmp / "w").write_text("1")
    first = with_inputs("own", [upstream], [raw])
    assert first != missing and first.startswith("own.")
    assert with_inputs("own", [upstream], [raw]) == first  # stable while nothing changes
    assert with_inputs("other", [upstream], [raw]) != first

    with staged_output(upstream, "crm-fp") as tmp:  # the same config run again: new weights
        (tmp / "w").write_text("2")
    assert is_done(upstream, "crm-fp")
    second = with_inputs("own", [upstream], [raw])
    assert second != first

    raw.write_text("1::2::4::978300760\n")  # edited in place: same size, new mtime
    import os

    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 1_000_000))
    assert with_inputs("own", [upstream], [raw]) != second


def test_identity_of_a_marker_from_before_identities_is_its_fingerprint(tmp_path):
    import json

    from reclora_ray.rundir import identity

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / MARKER).write_text(json.dumps({"fingerprint": "abc"}))
    assert identity(tmp_path / "old") == "abc"

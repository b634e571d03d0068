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

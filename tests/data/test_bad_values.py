"""Values that parse but are wrong, and files that do not decode: each stops `prepare` with one
message naming the file, the line and the field (issue 21, findings 1-3), or is dropped and
counted where the config says so; a raw file edited in place makes the prepared data stale."""

import gzip
import json

import pandas as pd
import pytest

from reclora_ray.cli import main as cli_main
from reclora_ray.data.checks import RawDataError
from reclora_ray.rundir import StageOutputExists
from tests.data.test_bad_input import assert_nothing_written, prepare

pytestmark = pytest.mark.ray


def replace_line(path, number: int, text: str) -> None:
    lines = path.read_text(encoding="latin-1").splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="latin-1")


@pytest.mark.parametrize(
    "dataset, file, line_no, bad_line, overrides, message",
    [
        (
            "ml-1m",
            "ratings.dat",
            3,
            "1::914::9::978301968",
            [],
            r"ratings\.dat, line 3: field 'rating' is outside 1\.\.5: 9 \(data.rating_range sets the range\)",
        ),
        (
            "ml-1m",
            "ratings.dat",
            2,
            "1::661::-2::978302109",
            [],
            r"ratings\.dat, line 2: field 'rating' is outside 1\.\.5: -2",
        ),
        (
            "ml-1m",
            "ratings.dat",
            3,
            "1::914::4::978301968",
            ["data.rating_range=[1,4.5]"],
            r"ratings\.dat, line 1: field 'rating' is outside 1\.\.4\.5: 5",
        ),
        (
            "ml-25m",
            "ratings.csv",
            3,
            "1,306,3.5,-5",
            [],
            r"ratings\.csv, line 3: field 'timestamp' is not a time between 1970 and 2100",
        ),
        (
            "ml-25m",
            "ratings.csv",
            4,
            "1,307,3.0,1147868828000",
            [],
            r"ratings\.csv, line 4: field 'timestamp' looks like milliseconds, not seconds: 1147868828000 \(set data.timestamp_unit=ms",
        ),
        ("ml-25m", "ratings.csv", 5, "2,296,,1147878820", [], r"ratings\.csv, line 5: field 'rating' is missing"),
        ("ml-25m", "ratings.csv", 6, "2,307,NA,1147879000", [], r"ratings\.csv, line 6: field 'rating' is missing"),
        ("ml-1m", "ratings.dat", 5, "::661::2::978299000", [], r"ratings\.dat, line 5: field 'user' is missing"),
    ],
)
def test_bad_values_name_file_line_and_field(
    ray_local, tmp_path, raw_dir, config, dataset, file, line_no, bad_line, overrides, message
):
    raw = raw_dir(dataset)
    replace_line(raw / file, line_no, bad_line)
    out = tmp_path / "run" / "data"
    with pytest.raises(RawDataError, match=message):
        prepare(config, dataset, raw, out, *overrides)
    assert_nothing_written(out)


def test_millisecond_timestamps_are_converted_when_asked(ray_local, tmp_path, raw_dir, config):
    raw = raw_dir("ml-25m")
    lines = (raw / "ratings.csv").read_text().splitlines()
    with_ms = [lines[0]] + [",".join(f.split(",")[:3] + [f.split(",")[3] + "123"]) for f in lines[1:]]
    (raw / "ratings.csv").write_text("\n".join(with_ms) + "\n")
    out = prepare(config, "ml-25m", raw, tmp_path / "run" / "data", "data.timestamp_unit=ms")
    stamps = pd.read_parquet(out / "sequences.parquet")["timestamps"].explode().astype(int)
    assert stamps.between(1147868817, 1147880044).all()


def test_exact_duplicates_are_dropped_and_counted_or_refused(ray_local, tmp_path, raw_dir, config):
    raw = raw_dir("ml-1m")
    lines = (raw / "ratings.dat").read_text().splitlines()
    (raw / "ratings.dat").write_text("\n".join(lines + [lines[1], lines[1], lines[4]]) + "\n")
    out = prepare(config, "ml-1m", raw, tmp_path / "run" / "data")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_parsed"] == 9 and meta["dropped"]["exact_duplicates"] == 3 and meta["n_rows"] == 6
    sequences = pd.read_parquet(out / "sequences.parquet")
    assert sum(len(items) for items in sequences["item_ids"]) == 6
    assert all(len(set(items)) == len(items) for items in sequences["item_ids"])

    refused = tmp_path / "refused" / "data"
    with pytest.raises(
        RawDataError,
        match=r"ml-1m: the ml-1m log: 3 rows repeat an earlier row exactly, e\.g\. user 1 item 661 "
        r"rating 3 timestamp 978302109 \(data.duplicates=drop",
    ):
        prepare(config, "ml-1m", raw, refused, "data.duplicates=refuse")
    assert_nothing_written(refused)


def test_one_label_class_is_refused_with_the_counts(ray_local, tmp_path, raw_dir, config):
    raw = raw_dir("ml-1m")
    out = tmp_path / "run" / "data"
    with pytest.raises(RawDataError, match=r"ml-1m: the valid split: every label is \d \(\d positive of 1 samples"):
        prepare(config, "ml-1m", raw, out, "data.single_class=refuse")  # the fixture's valid split is one sample
    lines = (raw / "ratings.dat").read_text().splitlines()
    (raw / "ratings.dat").write_text(
        "\n".join(line.replace("::5::", "::2::").replace("::4::", "::1::") for line in lines) + "\n"
    )
    with pytest.raises(
        RawDataError, match=r"the ml-1m log: every label is 0 \(0 positive of 6 samples, label rule rating >= 4\)"
    ):
        prepare(config, "ml-1m", raw, out, "data.single_class=refuse")
    assert_nothing_written(out)


@pytest.mark.parametrize("file", ["goodreads_interactions_fixture.json.gz", "goodreads_books_fixture.json.gz"])
def test_truncated_or_fake_gzip_names_the_file(ray_local, tmp_path, raw_dir, config, file):
    raw = raw_dir("goodreads")
    path = raw / file
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) * 2 // 3])
    out = tmp_path / "run" / "data"
    with pytest.raises(RawDataError, match=rf"{file.replace('.', '[.]')}, line \d+: not a complete gzip file"):
        prepare(config, "goodreads", raw, out)
    path.write_bytes(gzip.decompress(whole))  # plain text under a .json.gz name
    with pytest.raises(RawDataError, match=rf"{file.replace('.', '[.]')}, line 1: not a complete gzip file"):
        prepare(config, "goodreads", raw, out)
    assert_nothing_written(out)


def test_empty_file_and_non_utf8_text_name_the_file(ray_local, tmp_path, raw_dir, config):
    out = tmp_path / "run" / "data"
    raw = raw_dir("ml-1m")
    (raw / "ratings.dat").write_text("")
    with pytest.raises(RawDataError, match=r"ratings\.dat: the file is empty"):
        prepare(config, "ml-1m", raw, out)

    raw = raw_dir("ml-25m")
    movies = (raw / "movies.csv").read_bytes().replace(b"Pulp Fiction", b"Pulp Fict\xe9on")
    (raw / "movies.csv").write_bytes(movies)
    with pytest.raises(RawDataError, match=r"movies\.csv, line 2: not utf-8 text \(byte 0xe9 at position 13\)"):
        prepare(config, "ml-25m", raw, out)

    raw = raw_dir("goodreads")
    books = raw / "goodreads_books_fixture.json.gz"
    text = gzip.decompress(books.read_bytes()).replace(b"The Night Circus", b"The Night Circ\xe9s")
    books.write_bytes(gzip.compress(text))
    with pytest.raises(RawDataError, match=r"goodreads_books_fixture\.json\.gz, line 1: not UTF-8 text \(byte 0xe9"):
        prepare(config, "goodreads", raw, out)
    assert_nothing_written(out)


def test_cli_exits_2_with_one_line_for_a_bad_gzip(ray_local, tmp_path, raw_dir, caplog):
    raw = raw_dir("goodreads")
    (raw / "goodreads_interactions_fixture.json.gz").write_bytes(b"not gzip at all\n")
    code = cli_main(
        [
            "prepare",
            "--config",
            "tiny",
            "--set",
            "run.num_cpus=2",
            "--set",
            "data.k_core=0",
            "--dataset",
            "goodreads",
            "--raw-dir",
            str(raw),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith(f"{raw / 'goodreads_interactions_fixture.json.gz'}, line 1: not a complete gzip file")


def test_raw_file_edited_in_place_makes_the_prepared_data_stale(ray_local, tmp_path, raw_dir, config):
    raw = raw_dir("ml-1m")
    out = tmp_path / "run" / "data"
    prepare(config, "ml-1m", raw, out)
    assert prepare(config, "ml-1m", raw, out) == out  # untouched: up to date
    replace_line(raw / "ratings.dat", 2, "1::661::4::978302109")  # same size, new content
    with pytest.raises(StageOutputExists, match="was written by a different config"):
        prepare(config, "ml-1m", raw, out)

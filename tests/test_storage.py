import pytest

from reclora_ray.storage import package_dir


def test_package_dir_finds_an_installed_package():
    assert (package_dir("pytest", "unused") / "__init__.py").is_file()


def test_package_dir_raises_the_callers_install_hint():
    with pytest.raises(FileNotFoundError, match="pip install no-such-package"):
        package_dir("no_such_package_reclora", "pip install no-such-package")

"""The package: one version everywhere, an sdist that carries everything the build needs,
the licence and extras in the metadata, and benchmarks kept out of the test run.

The sdist is built once for the module (``python -m build --sdist --no-isolation``: runs
setup.py, compiles nothing; a few seconds) from a clean copy of the tree: setuptools would
otherwise also pack whatever a stale capsnet.egg-info/SOURCES.txt lists, hiding a gap in
MANIFEST.in. CI also builds the wheel from the sdist and installs both (.ci/package_check.sh).
"""

from __future__ import annotations

import configparser
import email.parser
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

import capsnet

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)
# Besides csrc/, what building and understanding the sdist needs.
TOP_LEVEL_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md")


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


def _source_files(folder: str = ".") -> list[str]:
    """The files of the source tree under folder, relative to the repository: those git tracks or
    would track (not ignored) in a checkout, else all on disk but build products."""
    if (REPO / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", folder],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.split("\0")
        return [name for name in listed if name and (REPO / name).is_file()]
    build_products = re.compile(r"(^|/)(build|dist|\.venv|__pycache__|[^/]*\.egg-info)(/|$)|\.so$")
    return [
        name for name in (str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*") if p.is_file())
        if not build_products.search(name)
    ]


def _clean_copy(destination: pathlib.Path) -> pathlib.Path:
    for name in _source_files():
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, destination / name)
    return destination


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """(file names relative to the sdist's top folder, PKG-INFO as a message, archive name)."""
    out = tmp_path_factory.mktemp("sdist")
    source = _clean_copy(tmp_path_factory.mktemp("source"))
    result = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, f"building the sdist failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    (archive,) = out.glob("capsnet-*.tar.gz")
    with tarfile.open(archive) as tar:
        top = archive.name.removesuffix(".tar.gz")
        names = {m.name.removeprefix(top + "/") for m in tar.getmembers() if m.isfile()}
        pkg_info = email.parser.Parser().parsestr(tar.extractfile(f"{top}/PKG-INFO").read().decode())
    return names, pkg_info, archive.name


def test_version_has_one_source():
    project = _pyproject()
    assert "version" not in project["project"], "pyproject.toml must not repeat the version"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "capsnet.__version__"}
    setup_py = (REPO / "setup.py").read_text()
    assert not re.search(r"\bversion\s*=", setup_py), "setup.py must not set a version: pyproject reads capsnet.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", capsnet.__version__), capsnet.__version__


def test_installed_metadata_has_the_version():
    try:
        installed = importlib.metadata.version("capsnet")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("capsnet is not installed: `pip install --no-build-isolation -e .` (make install)")
    assert installed == capsnet.__version__, (
        f"installed metadata says {installed}, capsnet.__version__ is {capsnet.__version__}: reinstall (make install)"
    )


def test_sdist_name_and_metadata_carry_the_version(sdist):
    _, pkg_info, archive = sdist
    assert archive == f"capsnet-{capsnet.__version__}.tar.gz"
    assert pkg_info["Version"] == capsnet.__version__


def test_sdist_carries_every_file_under_csrc(sdist):
    names, _, _ = sdist
    missing = sorted(set(_source_files("csrc")) - names)
    assert not missing, f"the sdist lacks {missing}: extend MANIFEST.in"


def test_sdist_carries_every_local_include(sdist):
    """Every #include "..." of every C++/CUDA file in the sdist resolves to a file in the sdist
    (next to the including file, or from csrc/, the include root setup.py passes)."""
    names, _, _ = sdist
    sources = sorted(n for n in names if n.startswith("csrc/") and n.endswith((".h", ".cuh", ".cpp", ".cu")))
    assert any(n.endswith(".cpp") for n in sources) and any(n.endswith(".h") for n in sources), sources
    unresolved = []
    for source in sources:
        for include in LOCAL_INCLUDE.findall((REPO / source).read_text()):
            beside = os.path.normpath(os.path.join(os.path.dirname(source), include))
            from_root = os.path.normpath(os.path.join("csrc", include))
            if beside not in names and from_root not in names:
                unresolved.append(f'{source}: #include "{include}"')
    assert not unresolved, f"includes the sdist cannot satisfy: {unresolved}"


def test_sdist_carries_the_build_files_and_licence(sdist):
    names, _, _ = sdist
    missing = [name for name in TOP_LEVEL_FILES if name not in names]
    assert not missing, f"the sdist lacks {missing}"


def test_metadata_licence_python_and_torch(sdist):
    _, pkg_info, _ = sdist
    assert pkg_info["License-Expression"] == "BSD-3-Clause"
    assert "BSD 3-Clause License" in (REPO / "LICENSE").read_text()
    assert pkg_info["Requires-Python"] == ">=3.10"
    major, minor = torch.__version__.split(".")[:2]
    requirements = pkg_info.get_all("Requires-Dist")
    # The extension's C++ ABI is that of the torch it is compiled against.
    assert f"torch=={major}.{minor}.*" in requirements, requirements


def test_metadata_extras(sdist):
    _, pkg_info, _ = sdist
    assert {"train", "tensorboard"} <= set(pkg_info.get_all("Provides-Extra"))
    train = {r.split(";")[0].strip() for r in pkg_info.get_all("Requires-Dist") if 'extra == "train"' in r}
    assert train == {"numpy", "torchvision", "tqdm", "matplotlib"}, train


def test_benchmarks_stay_out_of_make_test():
    """`make test` runs plain `pytest`: the test paths are tests/ alone, and the benchmarks
    (benchmarks/test_*.py, run by `pytest benchmarks/`) are outside them."""
    config = configparser.ConfigParser()
    config.read(REPO / "pytest.ini")
    testpaths = config["pytest"]["testpaths"].split()
    assert testpaths == ["tests"], testpaths
    benchmark_files = sorted((REPO / "benchmarks").glob("test_*.py"))
    assert benchmark_files, "no pytest-benchmark module under benchmarks/"
    for path in benchmark_files:
        assert not any(path.is_relative_to(REPO / p) for p in testpaths), path

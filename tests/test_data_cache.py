"""The on-disk cache of generated data sets (capsnet.datasets.cache) and its use by the
affNIST-like set: a set is built once and then read, every file is checked against its key
and digest, and a damaged, foreign or unwritable cache never changes a result."""

from __future__ import annotations

import pytest
import torch

from capsnet.datasets import DataOptions, get_dataset
from capsnet.datasets import affine_mnist as am
from capsnet.datasets import cache
from capsnet.datasets.mnist import load_mnist
from mnist_testing import mnist_root

KEY = {"seed": 3, "copies": 2}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


class CountingBuild:
    """A build function that records how often it ran."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.calls = tensor, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.tensor.clone()


def _set() -> torch.Tensor:
    return torch.randint(0, 256, (6, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_a_set_is_built_once_then_read_from_its_file(cache_dir):
    build = CountingBuild(_set())
    first = cache.cached_tensor("demo", KEY, build)
    second = cache.cached_tensor("demo", KEY, build)
    assert build.calls == 1
    assert torch.equal(first, build.tensor) and torch.equal(second, build.tensor)
    files = list(cache_dir.iterdir())
    assert [f.name for f in files] == [cache.cache_path("demo", KEY).name]  # no temporary left


def test_another_key_is_another_file(cache_dir):
    build = CountingBuild(_set())
    cache.cached_tensor("demo", KEY, build)
    cache.cached_tensor("demo", {**KEY, "copies": 3}, build)
    assert build.calls == 2
    assert len(list(cache_dir.iterdir())) == 2


def test_a_file_whose_contents_do_not_match_their_digest_is_rebuilt(cache_dir):
    build = CountingBuild(_set())
    cache.cached_tensor("demo", KEY, build)
    path = cache.cache_path("demo", KEY)
    stored = torch.load(path, weights_only=True)
    stored["tensor"][0, 0, 0, 0] ^= 1  # one bit of one pixel
    torch.save(stored, path)
    with pytest.warns(UserWarning, match=r"do not match their SHA-256 \(damaged\)"):
        again = cache.cached_tensor("demo", KEY, build)
    assert build.calls == 2 and torch.equal(again, build.tensor)
    assert torch.equal(cache.cached_tensor("demo", KEY, build), build.tensor)  # rewritten
    assert build.calls == 2


@pytest.mark.parametrize("damage", ["truncated", "foreign", "other key"])
def test_a_truncated_foreign_or_mislabelled_file_is_rebuilt_with_a_warning(cache_dir, damage):
    build = CountingBuild(_set())
    cache.cached_tensor("demo", KEY, build)
    path = cache.cache_path("demo", KEY)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
        reason = "cannot be read"
    elif damage == "foreign":
        torch.save(torch.zeros(3), path)
        reason = "not a capsnet cache file"
    else:
        stored = torch.load(path, weights_only=True)
        stored["key"] = {**KEY, "seed": 4}
        torch.save(stored, path)
        reason = "made for other parameters"
    with pytest.warns(UserWarning, match=reason):
        again = cache.cached_tensor("demo", KEY, build)
    assert build.calls == 2 and torch.equal(again, build.tensor)


def test_an_unwritable_cache_costs_a_warning_not_the_result(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(blocker / "cache"))  # unwritable, even for root
    build = CountingBuild(_set())
    with pytest.warns(UserWarning, match="could not cache the data set"):
        result = cache.cached_tensor("demo", KEY, build)
    assert torch.equal(result, build.tensor)


def test_a_write_that_fails_midway_leaves_no_file(cache_dir, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.os, "fsync", full_disk)
    build = CountingBuild(_set())
    with pytest.warns(UserWarning, match="No space left on device"):
        result = cache.cached_tensor("demo", KEY, build)
    assert torch.equal(result, build.tensor)
    assert list(cache_dir.iterdir()) == []  # the temporary file is gone, no partial file


def test_caching_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, "none")
    monkeypatch.chdir(tmp_path)
    build = CountingBuild(_set())
    cache.cached_tensor("demo", KEY, build)
    cache.cached_tensor("demo", KEY, build)
    assert build.calls == 2
    assert cache.cache_path("demo", KEY) is None


def test_the_default_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "capsnet"


def test_the_digest_depends_on_bytes_dtype_and_shape():
    a = torch.arange(6, dtype=torch.uint8)
    assert cache.tensor_digest(a) == cache.tensor_digest(a.clone())
    assert cache.tensor_digest(a) != cache.tensor_digest(a.view(2, 3))
    assert cache.tensor_digest(a) != cache.tensor_digest(a.to(torch.int8))
    b = a.clone()
    b[5] = 7
    assert cache.tensor_digest(a) != cache.tensor_digest(b)


def test_the_affine_set_is_cached_and_read_back_identically(cache_dir, monkeypatch):
    options = DataOptions(root=mnist_root(), image_shape=(1, 40, 40), limit=100)
    spec = get_dataset("expanded-mnist")
    first = spec.load(options, "affine", torch.device("cpu"))
    (path,) = cache_dir.iterdir()
    assert path.name.startswith("affine-mnist-")

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached set was rebuilt")

    monkeypatch.setattr(am, "affine_digits", no_rebuild)
    second = spec.load(options, "affine", torch.device("cpu"))
    indices = torch.arange(100)
    assert torch.equal(first.batch(indices)[0], second.batch(indices)[0])
    assert torch.equal(first.batch(indices)[1], second.batch(indices)[1])
    # Other source digits (another --limit) are another set, not this file.
    with pytest.raises(AssertionError, match="was rebuilt"):
        spec.load(DataOptions(root=mnist_root(), image_shape=(1, 40, 40), limit=99), "affine", torch.device("cpu"))


def test_the_cached_affine_set_is_the_one_its_seed_builds(cache_dir):
    options = DataOptions(root=mnist_root(), image_shape=(1, 40, 40), limit=50)
    loaded = get_dataset("expanded-mnist").load(options, "affine", torch.device("cpu"))
    built, _ = am.affine_digits(load_mnist(mnist_root(), train=False).images[:50], copies=1)
    assert torch.equal(loaded.batch(torch.arange(50))[0], built.float() / 255)

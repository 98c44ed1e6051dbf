"""Data sets: MNIST loading and its checks on damaged files, the missing-data message, the
data-set registry, batch order and sharding, and the paper's random shift (Sec. 5: up to 2
pixels in each direction, zero padding)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capsnet import datasets as data
from capsnet.datasets import DatasetFormatError, DatasetNotFoundError, ImageSet
from capsnet.datasets.idx import idx_bytes
from mnist_testing import mnist_root, write_small_mnist


# --- loading --------------------------------------------------------------------------------------


def test_real_mnist_loads_as_tensors():
    test_set = data.load_mnist(mnist_root(), train=False)
    assert len(test_set) == 10_000
    assert test_set.images.shape == (10_000, 1, 28, 28) and test_set.images.dtype == torch.uint8
    assert test_set.labels.dtype == torch.long
    assert sorted(test_set.labels.unique().tolist()) == list(range(10))
    images, labels = test_set.batch(torch.tensor([0, 1, 2]))
    assert images.dtype == torch.float32 and images.shape == (3, 1, 28, 28)
    assert images.min() >= 0 and images.max() == 1.0
    assert labels.tolist() == [7, 2, 1]  # the first three MNIST test digits
    train_set = data.load_mnist(mnist_root(), train=True)
    assert len(train_set) == 60_000


def test_missing_data_set_says_where_it_looked_and_how_to_supply_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        data.load_mnist(tmp_path, train=True, download=False)
    message = str(info.value)
    assert str((tmp_path / "MNIST" / "raw").resolve()) in message
    assert "--data-dir" in message and data.DATA_DIR_ENV in message and "--download" in message
    assert "train-images-idx3-ubyte" in message


def test_data_dir_resolution_order(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.resolve_data_dir(None) == Path("./data")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.resolve_data_dir(None) == tmp_path
    assert data.resolve_data_dir("elsewhere") == Path("elsewhere")


def test_head_and_padding():
    images = torch.arange(2 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    image_set = ImageSet(images, torch.tensor([3, 5]))
    assert len(image_set.head(1)) == 1 and image_set.head(None) is image_set
    padded = image_set.padded_to(8, 8)
    assert padded.images.shape == (2, 1, 8, 8)
    assert torch.equal(padded.images[:, :, 2:6, 2:6], images)
    assert padded.images.sum() == images.sum()
    with pytest.raises(ValueError, match="smaller"):
        image_set.padded_to(3, 3)


def test_image_set_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))


# --- damaged MNIST files: one clear error naming the file ---------------------------------------

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def _damage(raw: Path, name: str, content: bytes) -> Path:
    (raw / name).write_bytes(content)
    return raw / name


def test_small_valid_files_load(tmp_path):
    write_small_mnist(tmp_path, num_train=40, num_test=20)
    train_set = data.load_mnist(tmp_path, train=True)
    assert len(train_set) == 40 and train_set.images.shape == (40, 1, 28, 28)
    assert train_set.labels.tolist() == [i % 10 for i in range(40)]


@pytest.mark.parametrize(
    "case, name, make, message",
    [
        ("empty", TRAIN_IMAGES, lambda good: b"", r"is empty \(0 bytes\)"),
        ("header cut", TRAIN_IMAGES, lambda good: good[:10], r"truncated: 10 bytes"),
        ("data cut", TRAIN_IMAGES, lambda good: good[:-100], r"truncated: its header announces"),
        ("extra bytes", TRAIN_IMAGES, lambda good: good + b"\0" * 7, r"7 bytes after"),
        ("bad magic", TRAIN_IMAGES, lambda good: b"\x1f\x8b" + good[2:], r"magic number 0x1f8b"),
        ("labels as images", TRAIN_IMAGES, lambda good: idx_bytes(torch.zeros(40, dtype=torch.uint8)),
         r"magic number 0x00000801, expected 0x00000803"),
        ("wrong size", TRAIN_IMAGES, lambda good: idx_bytes(torch.zeros(40, 20, 20, dtype=torch.uint8)),
         r"holds 20x20 images, expected MNIST's 28x28"),
        ("count mismatch", TRAIN_LABELS, lambda good: idx_bytes(torch.zeros(39, dtype=torch.uint8)),
         r"holds 40 images but .*train-labels-idx1-ubyte holds 39 labels"),
        ("label out of range", TRAIN_LABELS,
         lambda good: idx_bytes(torch.tensor([3] * 17 + [12] + [0] * 22, dtype=torch.uint8)),
         r"has label 12 at index 17; MNIST labels are 0 to 9"),
    ],
)  # fmt: skip
def test_damaged_file_is_named_with_what_was_expected(tmp_path, case, name, make, message):
    raw = write_small_mnist(tmp_path)
    damaged = _damage(raw, name, make((raw / name).read_bytes()))
    with pytest.raises(DatasetFormatError, match=message) as info:
        data.load_mnist(tmp_path, train=True)
    assert str(damaged) in str(info.value) and "\n" not in str(info.value)


def test_the_test_split_is_checked_too(tmp_path):
    raw = write_small_mnist(tmp_path)
    _damage(raw, "t10k-labels-idx1-ubyte", b"")
    with pytest.raises(DatasetFormatError, match="t10k-labels-idx1-ubyte is empty"):
        data.load_mnist(tmp_path, train=False)


# --- the registry: how a data set plugs in --------------------------------------------------------


def test_mnist_is_registered_with_its_shape_and_classes():
    spec = data.get_dataset("mnist")
    assert "mnist" in data.dataset_names()
    assert spec.num_classes == 10 and spec.image_shape == (1, 28, 28)
    assert spec.image_shape_problem((1, 36, 36)) is None
    assert "at least 28x28" in spec.image_shape_problem((1, 20, 20))
    assert "1 channel" in spec.image_shape_problem((3, 28, 28))
    with pytest.raises(ValueError, match="unknown data set 'multi'; known data sets: mnist"):
        data.get_dataset("multi")


def test_registered_loader_limits_pads_and_augments_only_training_batches(tmp_path):
    write_small_mnist(tmp_path, num_train=40, num_test=20)
    spec = data.get_dataset("mnist")
    options = data.DataOptions(root=tmp_path, image_shape=(1, 32, 32), max_shift=2, limit=30)
    train_set = spec.load(options, "train", torch.device("cpu"))
    test_set = spec.load(options, "test", torch.device("cpu"))
    assert len(train_set) == 30 and len(test_set) == 20
    indices = torch.arange(8)
    plain, labels = train_set.batch(indices)
    assert plain.shape == (8, 1, 32, 32) and labels.tolist() == list(range(8))
    assert plain[:, :, :2].sum() == 0 and plain[:, :, -2:].sum() == 0  # padded by 2
    shifted, _ = train_set.batch(indices, data.step_generator(torch.device("cpu"), 0, 0, 0))
    assert not torch.equal(shifted, plain)
    test_plain, _ = test_set.batch(indices)
    test_again, _ = test_set.batch(indices, data.step_generator(torch.device("cpu"), 0, 0, 0))
    assert torch.equal(test_plain, test_again)  # the test split is never shifted


def test_registering_a_name_twice_is_an_error():
    spec = data.get_dataset("mnist")
    with pytest.raises(ValueError, match="already registered"):
        data.register_dataset(spec)


# --- order, shards, seeds -------------------------------------------------------------------------


def test_epoch_order_is_a_reproducible_permutation_that_changes_every_epoch():
    first = data.epoch_order(1000, seed=0, epoch=0)
    assert torch.equal(first.sort().values, torch.arange(1000))
    assert torch.equal(first, data.epoch_order(1000, seed=0, epoch=0))
    assert not torch.equal(first, data.epoch_order(1000, seed=0, epoch=1))
    assert not torch.equal(first, data.epoch_order(1000, seed=1, epoch=0))


def test_shards_are_disjoint_equal_and_drop_only_the_tail():
    order = data.epoch_order(103, seed=3, epoch=2)
    shards = [data.shard(order, rank, 4) for rank in range(4)]
    assert all(len(s) == 25 for s in shards)
    union = torch.cat(shards)
    assert len(union.unique()) == 100
    assert set(union.tolist()) == set(order[:100].tolist())
    with pytest.raises(ValueError, match="rank"):
        data.shard(order, 4, 4)


def test_derive_seed_separates_nearby_tuples():
    seeds = {data.derive_seed(0, 2, 0, step) for step in range(100)}
    assert len(seeds) == 100
    assert data.derive_seed(1, 2, 3) == data.derive_seed(1, 2, 3)
    assert 0 <= data.derive_seed(5) < 2**63
    with pytest.raises(ValueError, match="non-negative"):
        data.derive_seed(-1)


# --- shifts ---------------------------------------------------------------------------------------


def _shift_by_loop(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Slow per-sample oracle: out[i, j] = in[i - dy, j - dx], zero outside."""
    out = torch.zeros_like(images)
    height, width = images.shape[-2:]
    for b, (dy, dx) in enumerate(shifts.tolist()):
        for i in range(height):
            for j in range(width):
                src_i, src_j = i - dy, j - dx
                if 0 <= src_i < height and 0 <= src_j < width:
                    out[b, :, i, j] = images[b, :, src_i, src_j]
    return out


def test_shift_images_matches_a_per_sample_loop():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(12, 2, 7, 9, generator=generator)
    shifts = torch.tensor([[dy, dx] for dy in (-2, 0, 2) for dx in (-2, 1, 2, 0)])
    assert torch.equal(
        data.shift_images(images, shifts, max_shift=2), _shift_by_loop(images, shifts)
    )


def test_random_shift_moves_each_image_by_up_to_2_pixels_with_every_offset_used():
    count = 2000
    images = torch.zeros(count, 1, 28, 28)
    images[:, 0, 10, 13] = 1.0  # one bright pixel, well inside the border
    generator = torch.Generator().manual_seed(1)
    shifted = data.random_shift(images, max_shift=2, generator=generator)
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), torch.ones(count))  # nothing falls off
    position = shifted.view(count, -1).argmax(dim=1)
    dy, dx = position // 28 - 10, position % 28 - 13
    assert dy.abs().max() == 2 and dx.abs().max() == 2
    offsets = set(zip(dy.tolist(), dx.tolist(), strict=True))
    assert offsets == {(y, x) for y in range(-2, 3) for x in range(-2, 3)}


def test_random_shift_is_reproducible_and_pads_with_zeros():
    images = torch.ones(64, 1, 28, 28)
    first = data.random_shift(images, 2, torch.Generator().manual_seed(5))
    again = data.random_shift(images, 2, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert set(first.unique().tolist()) == {0.0, 1.0}  # zero padding, no interpolation
    assert torch.equal(data.random_shift(images, 0), images)
    with pytest.raises(ValueError, match="max_shift"):
        data.random_shift(images, -1)


def test_step_generator_depends_on_every_coordinate():
    device = torch.device("cpu")

    def draw(*coordinates):
        return torch.randint(0, 1000, (8,), generator=data.step_generator(device, *coordinates))

    base = draw(0, 1, 2, 0)
    assert torch.equal(base, draw(0, 1, 2, 0))
    for other in [(1, 1, 2, 0), (0, 2, 2, 0), (0, 1, 3, 0), (0, 1, 2, 1)]:
        assert not torch.equal(base, draw(*other)), other

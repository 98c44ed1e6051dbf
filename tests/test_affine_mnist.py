"""Expanded MNIST and the affNIST-like set (Sec. 5.2): placements on the 40x40 canvas, the
fixed test placements, and the affine set's ranges, ink, reproducibility and size."""

from __future__ import annotations

import pytest
import torch

from capsnet.datasets import DataOptions, get_dataset, step_generator
from capsnet.datasets import affine_mnist as am
from capsnet.datasets import expanded_mnist as em
from capsnet.datasets.ink import ink_boxes
from capsnet.datasets.mnist import load_mnist
from mnist_testing import mnist_root

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def test_digits():
    return load_mnist(mnist_root(), train=False)


@pytest.fixture(scope="module")
def affine_500(test_digits):
    return am.affine_digits(test_digits.images[:500], copies=2)


def _options(**changes) -> DataOptions:
    values = dict(root=mnist_root(), image_shape=(1, 40, 40), max_shift=em.MAX_SHIFT)
    values.update(changes)
    return DataOptions(**values)


def _ink(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1).sum(dim=1, dtype=torch.float64)


def test_spec_is_registered_with_its_canvas_and_evaluation_sets():
    spec = get_dataset("expanded-mnist")
    assert spec.image_shape == (1, 40, 40) and spec.num_classes == 10
    assert spec.splits == ("train", "test", "affine")
    assert spec.evaluation_splits == ("test", "affine")
    assert spec.default_max_shift == 6
    assert "at most 6 pixels" in spec.max_shift_problem((1, 40, 40), 7)


def test_training_digits_go_anywhere_on_the_canvas_and_stay_whole():
    spec = get_dataset("expanded-mnist")
    train = spec.load(_options(limit=256), "train", CPU)
    source = load_mnist(mnist_root(), train=True).head(256)
    tops, lefts = [], []
    for step in range(8):
        images, labels = train.batch(torch.arange(256), step_generator(CPU, 0, 0, step))
        assert images.shape == (256, 1, 40, 40) and labels.tolist() == source.labels.tolist()
        # Whole digits: every image keeps all its ink (a shift without cropping).
        torch.testing.assert_close(_ink(images), _ink(source.images.float() / 255))
        box = ink_boxes(images)
        frame = ink_boxes(source.padded_to(40, 40).images.float())
        tops.append(box[:, 0] - frame[:, 0])
        lefts.append(box[:, 2] - frame[:, 2])
    tops, lefts = torch.cat(tops), torch.cat(lefts)
    assert set(tops.tolist()) == set(range(-6, 7)) and set(lefts.tolist()) == set(range(-6, 7))


def test_the_test_placements_are_fixed_random_and_whole(test_digits):
    spec = get_dataset("expanded-mnist")
    test = spec.load(_options(limit=400, test_copies=3), "test", CPU)
    again = spec.load(_options(limit=400, test_copies=3), "test", CPU)
    assert len(test) == 1200
    images, labels = test.batch(torch.arange(1200))
    assert torch.equal(images, again.batch(torch.arange(1200))[0])
    assert labels.tolist() == test_digits.labels[:400].repeat(3).tolist()
    torch.testing.assert_close(_ink(images), _ink(test_digits.images[:400].float() / 255).repeat(3))
    assert int(test.shifts.abs().max()) == 6 and len(test.shifts.unique(dim=0)) > 150


def test_affine_parameters_are_within_the_affnist_ranges(affine_500):
    _, parameters = affine_500
    assert float(parameters.rotation_degrees.abs().max()) <= 20.0
    assert float(parameters.rotation_degrees.abs().max()) > 19.0  # the range is used
    assert float(parameters.shear.abs().max()) <= 0.2
    for scale in (parameters.scale_x, parameters.scale_y):
        assert 0.8 <= float(scale.min()) < 0.81 and 1.19 < float(scale.max()) <= 1.2
    assert not torch.equal(parameters.scale_x, parameters.scale_y)  # independent scales


def test_affine_images_keep_their_ink_inside_the_canvas(test_digits, affine_500):
    images, parameters = affine_500
    assert images.shape == (1000, 1, 40, 40) and images.dtype == torch.uint8
    source = test_digits.images[:500].repeat(2, 1, 1, 1)
    # Resampling keeps the ink's mass up to the area scale: nothing was cut off.
    ratio = _ink(images.float()) / _ink(source.float()) / am.relative_area(parameters)
    assert float(ratio.min()) > 0.93 and float(ratio.max()) < 1.07
    # Translations reach every side of the canvas (not always centred).
    box = ink_boxes(images)
    assert bool((box[:, 0] == 0).any()) and bool((box[:, 1] == 39).any())
    assert bool((box[:, 2] == 0).any()) and bool((box[:, 3] == 39).any())


def test_the_linear_map_is_rotation_shear_and_scale():
    def values(*numbers):
        return torch.tensor(numbers, dtype=torch.float64)

    maps = am.linear_maps(
        values(90.0, 0.0, 0.0), values(0.0, 0.2, 0.0), values(1.0, 1.0, 1.2), values(1.0, 1.0, 0.8)
    )
    expected = torch.tensor(
        [[[0.0, -1.0], [1.0, 0.0]], [[1.0, 0.2], [0.0, 1.0]], [[1.2, 0.0], [0.0, 0.8]]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(maps, expected)


def test_affine_set_is_reproducible_from_its_seed(test_digits):
    digits = test_digits.images[:200]
    first, first_parameters = am.affine_digits(digits, copies=1)
    again, _ = am.affine_digits(digits, copies=1)
    other, _ = am.affine_digits(digits, copies=1, seed=am.AFFINE_SEED + 1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # The registered split is this set, in MNIST test order, with MNIST's labels.
    spec = get_dataset("expanded-mnist")
    affine = spec.load(_options(limit=200), "affine", CPU)
    images, labels = affine.batch(torch.arange(200))
    assert torch.equal(images, first.float() / 255)
    assert torch.equal(labels, test_digits.labels[:200])
    assert len(spec.load(_options(limit=50, test_copies=4), "affine", CPU)) == 200


def test_a_digit_too_large_for_the_canvas_is_an_error_not_a_cut(monkeypatch):
    blob = torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)  # ink up to the frame's edge
    monkeypatch.setattr(am, "SCALE_RANGE", (1.5, 1.6))  # 28 * 1.5 = 42 > 40 pixels
    with pytest.raises(ValueError, match="reaches the border of the 40x40 canvas"):
        am.affine_digits(blob, copies=2)

"""MultiMNIST (Sec. 6): the pair generator (shapes, values, classes, shifts, overlap,
determinism), the fixed test set, the margin loss with both digits present, the top-2
evaluation and the two-digit objective."""

from __future__ import annotations

import itertools

import pytest
import torch

from capsnet.datasets import DataOptions, ImageSet, get_dataset, step_generator
from capsnet.datasets import multimnist as mm
from capsnet.datasets.mnist import load_mnist
from capsnet.losses import margin_loss
from capsnet.model import CapsNet, CapsNetConfig
from capsnet.training.objective import MultiDigitCapsNetObjective, top_k_matches
from mnist_testing import mnist_root

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def test_digits() -> ImageSet:
    return load_mnist(mnist_root(), train=False)


@pytest.fixture(scope="module")
def pool(test_digits) -> mm.DigitPool:
    return mm.DigitPool(test_digits.head(2000).padded_to(mm.CANVAS, mm.CANVAS))


def _options(**changes) -> DataOptions:
    values = dict(root=mnist_root(), image_shape=(1, 36, 36), max_shift=mm.MAX_SHIFT)
    values.update(changes)
    return DataOptions(**values)


def _recover_shift(alone: torch.Tensor, source: torch.Tensor, max_shift: int) -> tuple[int, int]:
    """The (down, right) shift that turns the centred ``source`` into ``alone``; fails the
    test if no shift within ``max_shift`` does. (``roll`` moves only zeros across the
    border: the digit's 28x28 frame has ``max_shift`` pixels of padding on every side.)"""
    for dy, dx in itertools.product(range(-max_shift, max_shift + 1), repeat=2):
        if torch.equal(torch.roll(source, shifts=(dy, dx), dims=(-2, -1)), alone):
            return dy, dx
    pytest.fail(f"no shift within {max_shift} pixels reproduces the digit")


def test_spec_is_registered_with_the_papers_canvas_and_two_labels():
    spec = get_dataset("multimnist")
    assert spec.image_shape == (1, 36, 36) and spec.num_classes == 10
    assert spec.labels_per_example == 2 and spec.default_max_shift == 4
    assert spec.default_test_copies == mm.DEFAULT_TEST_COPIES == 10
    assert spec.max_shift_problem((1, 36, 36), 4) is None
    assert "at most 4 pixels" in spec.max_shift_problem((1, 36, 36), 5)
    assert spec.max_shift_problem((1, 40, 40), 6) is None


def test_training_batch_shapes_values_classes_and_the_clipped_sum(pool):
    pairs = mm.RandomPairs(pool, mm.MAX_SHIFT)
    assert len(pairs) == len(pool)
    indices = torch.arange(64)
    images, targets = pairs.batch(indices, step_generator(CPU, seed=0, epoch=0, step=0))
    assert images.shape == (64, 1, 36, 36) and images.dtype == torch.float32
    assert targets.labels.shape == (64, 2) and targets.labels.dtype == torch.long
    assert targets.digits.shape == (64, 2, 1, 36, 36)
    assert 0 <= float(images.min()) and float(images.max()) == 1.0
    # The first digit of example i is digit i; the second is of another class.
    assert torch.equal(targets.labels[:, 0], pool.digits.labels[indices])
    assert bool((targets.labels[:, 0] != targets.labels[:, 1]).all())
    # Pixel values are added and clipped at 1 (on the 8-bit intensities, exactly).
    added = (targets.digits * 255).round().sum(dim=1).clamp(max=255) / 255
    assert torch.equal(images, added)
    assert bool((targets.digits.sum(dim=1) > 1).any()), "no pixel needed clipping: no overlap?"


def test_each_digit_is_the_source_digit_shifted_by_at_most_4_pixels(pool):
    pairs = mm.RandomPairs(pool, mm.MAX_SHIFT)
    generator = step_generator(CPU, seed=3, epoch=1, step=2)
    _, targets = pairs.batch(torch.arange(60), generator)
    intensities = (targets.digits * 255).round().to(torch.uint8)
    seen = []
    for b in range(60):
        seen.append(_recover_shift(intensities[b, 0], pool.digits.images[b], mm.MAX_SHIFT))
        # The partner: a digit of the labelled class, shifted within bounds.
        label = int(targets.labels[b, 1])
        ink = int(intensities[b, 1].sum(dtype=torch.long))
        candidates = [
            c for c in (pool.digits.labels == label).nonzero().squeeze(1).tolist()
            if int(pool.digits.images[c].sum(dtype=torch.long)) == ink
        ]  # fmt: skip
        assert any(
            _shift_within(intensities[b, 1], pool.digits.images[c], mm.MAX_SHIFT)
            for c in candidates
        ), f"example {b}: the second digit is no shifted digit of class {label}"
    # Over 60 examples, every shift value from -4 to 4 occurs on each axis.
    for axis in range(2):
        assert {shift[axis] for shift in seen} == set(range(-4, 5))


def _shift_within(alone: torch.Tensor, source: torch.Tensor, max_shift: int) -> bool:
    return any(
        torch.equal(torch.roll(source, shifts=(dy, dx), dims=(-2, -1)), alone)
        for dy, dx in itertools.product(range(-max_shift, max_shift + 1), repeat=2)
    )


def test_fixed_shifts_are_uniform_over_minus_4_to_4(pool):
    pairs = mm.fixed_pairs(pool, copies=10, max_shift=4)
    counts = torch.bincount((pairs.shifts.long() + 4).flatten(), minlength=9).double()
    assert len(counts) == 9  # nothing outside [-4, 4]
    # 80,000 draws: each value 1/9 of them within 5% (sampling error about 1%).
    assert torch.allclose(counts / counts.sum(), torch.full((9,), 1 / 9, dtype=torch.float64),
                          rtol=0.05)  # fmt: skip


def test_partners_are_uniform_over_the_other_classes(pool):
    first = torch.zeros(60_000, dtype=torch.long)  # digit 0 of the pool, a 7
    generator = torch.Generator().manual_seed(0)
    partners = pool.partners(first, torch.rand(60_000, generator=generator, dtype=torch.float64))
    classes = pool.digits.labels[partners]
    base = int(pool.digits.labels[0])
    assert not bool((classes == base).any())
    observed = torch.bincount(classes, minlength=10).double()
    expected = pool.class_count.double().clone()
    expected[base] = 0
    expected *= 60_000 / expected.sum()
    # Every other class drawn in proportion to its digits (within 5%; sampling error ~1.3%).
    others = expected > 0
    assert torch.allclose(observed[others], expected[others], rtol=0.05)
    # 60,000 draws over ~1,800 digits of other classes reach (almost surely) every one of them.
    assert set(partners.unique().tolist()) == set(
        (pool.digits.labels != base).nonzero().squeeze(1).tolist()
    )


def test_the_same_step_seed_gives_the_same_batch_and_another_seed_another(pool):
    pairs = mm.RandomPairs(pool, mm.MAX_SHIFT)
    indices = torch.arange(100, 164)
    first = pairs.batch(indices, step_generator(CPU, 7, 2, 11))
    again = pairs.batch(indices, step_generator(CPU, 7, 2, 11))
    other = pairs.batch(indices, step_generator(CPU, 7, 2, 12))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1].labels, again[1].labels)
    assert not torch.equal(first[0], other[0])


def test_training_pairs_need_the_step_generator(pool):
    with pytest.raises(ValueError, match="step's generator"):
        mm.RandomPairs(pool, 4).batch(torch.arange(4), None)


def test_fixed_test_set_is_reproducible_sized_and_without_repeated_partners(test_digits):
    spec = get_dataset("multimnist")
    limited = _options(limit=300, test_copies=7)
    first = spec.load(limited, "test", CPU)
    second = spec.load(limited, "test", CPU)
    assert len(first) == 300 * 7
    assert torch.equal(first.second, second.second) and torch.equal(first.shifts, second.shifts)
    images_a, targets_a = first.batch(torch.arange(len(first)))
    images_b, _ = second.batch(torch.arange(len(first)))
    assert torch.equal(images_a, images_b)
    assert bool((targets_a.labels[:, 0] != targets_a.labels[:, 1]).all())
    # Copy-major order: the first 300 pairs have 300 different first digits.
    assert torch.equal(first.first[:300], torch.arange(300))
    # Each digit's 7 partners are 7 different digits (drawn without replacement).
    partners = first.second.view(7, 300).t()
    assert all(len(set(row)) == 7 for row in partners.tolist())
    assert int(first.shifts.abs().max()) == 4
    # The default size: 10 pairs per test digit, 100,000 for the whole test set.
    assert len(spec.load(_options(limit=50), "test", CPU)) == 500


def test_too_many_pairs_per_digit_is_a_clear_error(test_digits):
    pool = mm.DigitPool(test_digits.head(20).padded_to(36, 36))
    with pytest.raises(ValueError, match="test_copies=30 pairs per digit need as many digits"):
        mm.fixed_pairs(pool, copies=30, max_shift=4)


def test_a_pool_of_one_class_is_refused():
    digits = ImageSet(torch.zeros(5, 1, 36, 36, dtype=torch.uint8), torch.full((5,), 3))
    with pytest.raises(ValueError, match="at least two classes"):
        mm.DigitPool(digits)


def test_overlap_statistics(test_digits):
    """Sec. 6: "two digits bounding boxes on average have 80% overlap" (20x20 boxes shifted
    by up to 4 pixels). The nominal 20x20-box overlap of this set's shifts must equal its
    exact expectation for independent uniform shifts in [-4, 4] (72.57%); the overlap of
    the digits' actual ink boxes is what docs/EXPERIMENTS.md reports (63.8% on the full
    100,000-pair test set; between 60% and 68% on any 20,000 pairs)."""
    pool = mm.DigitPool(test_digits.head(2000).padded_to(36, 36))
    pairs = mm.fixed_pairs(pool, copies=10, max_shift=4)
    values = torch.arange(-4, 5, dtype=torch.float64)
    per_axis = ((20 - (values[:, None] - values[None, :]).abs()) / 20).mean()
    expected = float(per_axis**2)
    assert expected == pytest.approx(0.72565, abs=1e-5)
    nominal = mm.nominal_box_overlap(pairs.shifts).mean()
    assert float(nominal) == pytest.approx(expected, abs=0.005)  # sampling error ~0.001
    _, targets = pairs.batch(torch.arange(len(pairs)))
    ink = mm.ink_box_overlap(targets.digits)
    assert 0.60 < float(ink.mean()) < 0.68
    # A pair without shifts overlaps completely; boxes apart do not overlap.
    same = torch.zeros(1, 2, 1, 36, 36)
    same[0, :, 0, 10:20, 10:20] = 1
    assert float(mm.ink_box_overlap(same)) == 1.0
    apart = torch.zeros(1, 2, 1, 36, 36)
    apart[0, 0, 0, 0:5, 0:5] = 1
    apart[0, 1, 0, 20:30, 20:30] = 1
    assert float(mm.ink_box_overlap(apart)) == 0.0


# --- margin loss with two digits, top-2 evaluation, the objective --------------------------------


def test_margin_loss_with_two_digits_present_counts_both():
    lengths = torch.tensor([[0.95, 0.2, 0.5, 0.0], [0.05, 0.6, 0.7, 0.3]])
    labels = torch.tensor([[0, 2], [1, 2]])
    # By hand, Eq. 4 with T = 1 for both listed classes.
    row0 = (0.9 - 0.95) ** 2 * 0 + 0.5 * (0.2 - 0.1) ** 2 + (0.9 - 0.5) ** 2 + 0.0
    row1 = 0.0 + (0.9 - 0.6) ** 2 + (0.9 - 0.7) ** 2 + 0.5 * (0.3 - 0.1) ** 2
    assert float(margin_loss(lengths, labels)) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # One label per row is the old behaviour.
    single = margin_loss(lengths, labels[:, 0])
    assert float(single) == pytest.approx(float(margin_loss(lengths, labels[:, :1])), rel=1e-7)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, K\]"):
        margin_loss(lengths, labels.unsqueeze(0))


@pytest.mark.parametrize(
    "lengths, labels, matches",
    [
        ([0.9, 0.8, 0.1, 0.0], [0, 1], [True, True]),  # both right
        ([0.9, 0.8, 0.1, 0.0], [1, 0], [True, True]),  # order does not matter
        ([0.9, 0.1, 0.8, 0.0], [0, 1], [True, False]),  # one right
        ([0.1, 0.2, 0.8, 0.9], [0, 1], [False, False]),  # none right
        ([0.5, 0.5, 0.5, 0.9], [3, 1], [True, False]),  # ties: the lower index wins
    ],
)  # fmt: skip
def test_top_2_against_hand_made_cases(lengths, labels, matches):
    got = top_k_matches(torch.tensor([lengths]), torch.tensor([labels]))
    assert got.tolist() == [matches]


def test_top_2_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"labels must be \[B, K\]"):
        top_k_matches(torch.rand(3, 10), torch.tensor([1, 2, 3]))


class _FixedCapsules(torch.nn.Module):
    """A stand-in network returning given capsule lengths, for scoring checks."""

    def __init__(self, lengths: torch.Tensor) -> None:
        super().__init__()
        self.lengths = lengths

    def forward(self, images, labels=None, *, mask="auto"):
        from capsnet.model import CapsNetOutput

        caps = torch.zeros(*self.lengths.shape, 16)
        caps[..., 0] = self.lengths
        return CapsNetOutput(caps, self.lengths, None, None)


def test_objective_counts_an_example_correct_only_if_both_digits_are():
    lengths = torch.tensor(
        [[0.9, 0.8, 0, 0, 0, 0, 0, 0, 0, 0],  # labels 0, 1: right
         [0.9, 0, 0.8, 0, 0, 0, 0, 0, 0, 0],  # labels 0, 1: one digit right
         [0, 0, 0.9, 0.8, 0, 0, 0, 0, 0, 0]],  # labels 0, 1: none right
    )  # fmt: skip
    labels = torch.tensor([[0, 1], [0, 1], [0, 1]])
    targets = mm.PairTargets(labels, torch.zeros(3, 2, 1, 36, 36))
    objective = MultiDigitCapsNetObjective(reconstruction_weight=0.0005)
    result = objective(_FixedCapsules(lengths).eval(), torch.zeros(3, 1, 36, 36), targets)
    assert int(result.correct) == 1
    names = dict(zip(objective.term_names, result.terms.tolist(), strict=True))
    assert names["digit_accuracy"] == pytest.approx(3 / 6)
    assert names["reconstruction_loss"] == 0.0  # no decoder
    assert names["loss"] == pytest.approx(names["margin_loss"])


def _small_capsnet() -> CapsNet:
    torch.manual_seed(0)
    config = CapsNetConfig(
        input_shape=(1, 36, 36), conv1_channels=8, primary_types=2, decoder_hidden=(16,)
    )
    return CapsNet(config, routing_backend="reference")


def test_each_digit_is_reconstructed_from_its_own_capsule_and_the_losses_summed():
    model = _small_capsnet().train()
    images = torch.rand(4, 1, 36, 36)
    digits = torch.rand(4, 2, 1, 36, 36)
    labels = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 0]])
    objective = MultiDigitCapsNetObjective(reconstruction_weight=0.5)
    result = objective(model, images, mm.PairTargets(labels, digits))
    out = model(images, labels[:, 0], mask="true")
    second = model.decoder(out.digit_caps, labels[:, 1])
    by_hand = (
        ((out.reconstructions - digits[:, 0]) ** 2).flatten(1).sum(1)
        + ((second - digits[:, 1]) ** 2).flatten(1).sum(1)
    ).mean() * 0.5
    terms = dict(zip(objective.term_names, result.terms, strict=True))
    torch.testing.assert_close(terms["reconstruction_loss"], by_hand)
    torch.testing.assert_close(terms["margin_loss"], margin_loss(out.lengths, labels))
    result.total.backward()
    assert model.decoder.net[0].weight.grad is not None


def test_predicted_reconstructions_are_matched_to_the_digits_in_the_better_order():
    model = _small_capsnet().eval()
    images = torch.rand(3, 1, 36, 36)
    labels = torch.tensor([[1, 2], [3, 4], [5, 6]])
    objective = MultiDigitCapsNetObjective(reconstruction_weight=1.0)
    output, selected, made, use_true = objective.reconstruct(model, images, labels, "predicted")
    assert not use_true and made.shape == (3, 2, 1, 36, 36)
    assert torch.equal(selected, output.lengths.topk(2, dim=1).indices)
    # Targets equal to the reconstructions in swapped order: the matched loss is zero.
    swapped = mm.PairTargets(labels, made.flip(1).detach())
    result = objective(model, images, swapped, mask="predicted")
    assert float(dict(zip(objective.term_names, result.terms.detach()))["reconstruction_loss"]) < 1e-10

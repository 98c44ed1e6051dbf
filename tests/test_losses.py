"""Margin loss (Sec. 3, Eq. 4) and reconstruction loss (Sec. 4.1) against hand-computed values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from capsnet.losses import (
    RECONSTRUCTION_WEIGHT,
    capsnet_loss,
    margin_loss,
    reconstruction_loss,
)

# Three classes, two samples. By hand with m+ = 0.9, m- = 0.1, lambda = 0.5:
#   sample 0, label 0: present 0.95 >= 0.9 -> 0; absent 0.05 <= 0.1 -> 0;
#                      absent 0.3 -> 0.5 * (0.3 - 0.1)^2 = 0.02.            sum 0.02
#   sample 1, label 2: present 0.05 -> (0.9 - 0.05)^2 = 0.7225; absent 0.5 -> 0.5 * 0.4^2
#                      = 0.08; absent 0.2 -> 0.5 * 0.1^2 = 0.005.           sum 0.8075
#   mean over the batch: (0.02 + 0.8075) / 2 = 0.41375
LENGTHS = torch.tensor([[0.95, 0.05, 0.3], [0.5, 0.2, 0.05]], dtype=torch.float64)
LABELS = torch.tensor([0, 2])
MARGIN_BY_HAND = 0.41375

# Two 1x2x2 images. Image 0: zeros vs 0.5 everywhere -> 4 * 0.25 = 1.0.
# Image 1: ones vs [[1, 0.5], [0, 1]] -> 0.25 + 1 = 1.25. Mean: 1.125.
IMAGES = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]], dtype=torch.float64)
RECONSTRUCTIONS = torch.tensor(
    [[[[0.5, 0.5], [0.5, 0.5]]], [[[1.0, 0.5], [0.0, 1.0]]]], dtype=torch.float64
)
RECONSTRUCTION_BY_HAND = 1.125


def test_margin_loss_matches_hand_computation():
    assert margin_loss(LENGTHS, LABELS).item() == pytest.approx(MARGIN_BY_HAND, abs=1e-12)


def test_margin_loss_is_summed_over_classes_and_averaged_over_the_batch():
    # Doubling the batch by repetition keeps the mean; each sample's loss is a class sum.
    doubled = margin_loss(torch.cat([LENGTHS, LENGTHS]), torch.cat([LABELS, LABELS]))
    assert doubled.item() == pytest.approx(MARGIN_BY_HAND, abs=1e-12)
    assert margin_loss(LENGTHS[1:], LABELS[1:]).item() == pytest.approx(0.8075, abs=1e-12)


def test_margin_loss_is_zero_inside_the_margins_and_has_the_paper_constants():
    perfect = torch.tensor([[0.95, 0.0, 0.1]])
    assert margin_loss(perfect, torch.tensor([0])).item() == 0.0
    # Custom constants are honoured: lambda = 1, m- = 0 makes absent classes cost |v|^2.
    loss = margin_loss(torch.tensor([[0.9, 0.3]]), torch.tensor([0]), m_minus=0.0, lambda_=1.0)
    assert loss.item() == pytest.approx(0.09)


def test_margin_loss_gradient_pushes_the_right_way():
    lengths = LENGTHS.clone().requires_grad_(True)
    margin_loss(lengths, LABELS).backward()
    # Present class too short: gradient negative (grow it); absent class too long: positive.
    assert lengths.grad[1, 2] < 0
    assert lengths.grad[1, 0] > 0
    assert lengths.grad[0, 0] == 0 and lengths.grad[0, 1] == 0


def test_reconstruction_loss_matches_hand_computation():
    loss = reconstruction_loss(RECONSTRUCTIONS, IMAGES)
    assert loss.item() == pytest.approx(RECONSTRUCTION_BY_HAND, abs=1e-12)


def test_total_loss_adds_the_scaled_reconstruction_term_and_reports_both():
    output = SimpleNamespace(lengths=LENGTHS, reconstructions=RECONSTRUCTIONS)
    terms = capsnet_loss(output, IMAGES, LABELS)
    assert RECONSTRUCTION_WEIGHT == 0.0005
    assert terms.margin.item() == pytest.approx(MARGIN_BY_HAND, abs=1e-12)
    assert terms.reconstruction.item() == pytest.approx(0.0005 * RECONSTRUCTION_BY_HAND, abs=1e-15)
    assert terms.total.item() == pytest.approx(
        MARGIN_BY_HAND + 0.0005 * RECONSTRUCTION_BY_HAND, abs=1e-12
    )


def test_reconstruction_term_is_zero_without_decoder_or_weight():
    no_decoder = SimpleNamespace(lengths=LENGTHS, reconstructions=None)
    assert capsnet_loss(no_decoder, IMAGES, LABELS).reconstruction.item() == 0.0
    output = SimpleNamespace(lengths=LENGTHS, reconstructions=RECONSTRUCTIONS)
    terms = capsnet_loss(output, IMAGES, LABELS, reconstruction_weight=0.0)
    assert terms.reconstruction.item() == 0.0
    assert terms.total.item() == pytest.approx(MARGIN_BY_HAND)
    with pytest.raises(ValueError, match="reconstruction_weight"):
        capsnet_loss(output, IMAGES, LABELS, reconstruction_weight=-1.0)


def test_reduced_precision_inputs_give_a_float32_loss():
    lengths = LENGTHS.to(torch.bfloat16)
    assert margin_loss(lengths, LABELS).dtype == torch.float32
    recon = reconstruction_loss(RECONSTRUCTIONS.to(torch.bfloat16), IMAGES.float())
    assert recon.dtype == torch.float32
    assert recon.item() == pytest.approx(RECONSTRUCTION_BY_HAND, rel=1e-2)


def test_shape_mismatches_name_the_argument():
    with pytest.raises(ValueError, match="reconstructions must have the shape of images"):
        reconstruction_loss(RECONSTRUCTIONS[:1], IMAGES)
    with pytest.raises(ValueError, match="labels must be"):
        margin_loss(LENGTHS, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="lengths must be"):
        margin_loss(LENGTHS[0], LABELS)

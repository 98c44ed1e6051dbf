"""The paper's baseline CNN (Sec. 5): its architecture and 35.4M parameters, its objective,
and how the training program takes it (--model cnn-baseline)."""

from __future__ import annotations

import pytest
import torch

from capsnet.baselines import BaselineCNN, conv_padding
from capsnet.model import CapsNetConfig
from capsnet.training.config import TrainConfig
from capsnet.training.errors import ConfigError
from capsnet.training.models import build_model, build_objective, uses_routing
from capsnet.training.objective import CrossEntropyObjective

# Sec. 5: "35.4M parameters". Conv layers 6,656 + 1,638,656 + 819,328; FC 32,915,784
# (100,352 -> 328) + 63,168 + 1,930.
PAPER_PARAMETERS = 35_445_522


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", [28, 40])
def test_parameter_count_is_the_papers_35_4_million(size):
    model = BaselineCNN((1, size, size))
    assert _count(model) == PAPER_PARAMETERS
    assert model.feature_shape == (128, 28, 28)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [256, 256, 128]
    assert all(c.kernel_size == (5, 5) and c.stride == (1, 1) for c in convs)
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [328, 192, 10]
    assert any(isinstance(m, torch.nn.Dropout) for m in model.classifier)


def test_padding_keeps_28x28_features_where_it_can():
    assert conv_padding(28) == 2 and conv_padding(34) == 1 and conv_padding(40) == 0
    assert conv_padding(36) == 2  # no equal padding gives 28x28: "same"
    assert BaselineCNN((1, 36, 36)).feature_shape == (128, 36, 36)


def test_forward_gives_logits_and_checks_its_input():
    model = BaselineCNN((1, 40, 40)).eval()
    logits = model(torch.rand(3, 1, 40, 40))
    assert logits.shape == (3, 10) and bool(torch.isfinite(logits).all())
    with pytest.raises(ValueError, match=r"images must have shape \[B, 1, 40, 40\]"):
        model(torch.rand(3, 1, 28, 28))
    with pytest.raises(ValueError, match="dropout"):
        BaselineCNN(dropout=1.0)


def test_cross_entropy_objective_scores_the_largest_logit():
    class Fixed(torch.nn.Module):
        def forward(self, images):
            return torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.5, 0.0]])

    result = CrossEntropyObjective()(Fixed(), torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 0]))
    assert int(result.correct) == 2
    expected = torch.nn.functional.cross_entropy(
        Fixed()(None), torch.tensor([0, 1, 0])
    )  # fmt: skip
    torch.testing.assert_close(result.total, expected)
    assert result.terms.shape == (1,)


def test_training_program_builds_it_from_the_run_settings():
    config = TrainConfig(
        dataset="expanded-mnist", architecture="cnn-baseline",
        model=CapsNetConfig(input_shape=(1, 40, 40)),
    )  # fmt: skip
    assert isinstance(build_model(config), BaselineCNN)
    assert isinstance(build_objective(config), CrossEntropyObjective)
    assert not uses_routing(config)


def test_capsnet_settings_and_multi_digit_data_are_refused_for_the_cnn():
    with pytest.raises(ConfigError, match="model.routing_iterations is a CapsNet setting"):
        TrainConfig(architecture="cnn-baseline", model=CapsNetConfig(routing_iterations=2))
    with pytest.raises(ConfigError, match="cnn-baseline classifies one digit per image"):
        TrainConfig(
            dataset="multimnist", architecture="cnn-baseline",
            model=CapsNetConfig(input_shape=(1, 36, 36)),
        )  # fmt: skip

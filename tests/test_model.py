"""CapsNet model: shapes, parameter counts, PrimaryCaps capsule grouping, decoder masking,
routing wiring, input checks (Sabour et al., 2017, Sec. 4); the model on the meta device
and compiled as one graph; the core package without the training dependencies."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from capsnet import _extension
from capsnet.layers import DigitCaps, PrimaryCaps, ReconstructionDecoder
from capsnet.losses import capsnet_loss
from capsnet.model import CapsNet, CapsNetConfig, ConfigFieldError
from capsnet.reference import dynamic_routing_reference, squash
from mnist_testing import REPO

PAPER = CapsNetConfig()


def reference_model(config: CapsNetConfig = PAPER) -> CapsNet:
    """The network with the pure-PyTorch routing (the tests of the layers' wiring)."""
    return CapsNet(config, routing_backend="reference")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- parameter counts -----------------------------------------------------------------------------


def test_parameter_count_of_paper_network_with_masked_decoder():
    model = reference_model()
    # Conv1 9*9*1*256 + 256; PrimaryCaps 9*9*256*256 + 256; W 1152*10*16*8;
    # decoder 160*512+512, 512*1024+1024, 1024*784+784.
    assert count_parameters(model.conv1) == 20_992
    assert count_parameters(model.primary_caps) == 5_308_672
    assert count_parameters(model.digit_caps) == 1_474_560
    assert count_parameters(model.decoder) == 82_432 + 525_312 + 803_600
    assert count_parameters(model) == 8_215_568


def test_parameter_count_of_target_capsule_decoder():
    model = reference_model(dataclasses.replace(PAPER, decoder_input="target"))
    assert count_parameters(model.decoder) == 16 * 512 + 512 + 525_312 + 803_600
    assert count_parameters(model) == 8_141_840


def test_capsule_bias_and_no_reconstruction_change_the_count_as_expected():
    with_bias = reference_model(dataclasses.replace(PAPER, capsule_bias=True))
    assert count_parameters(with_bias) == 8_215_568 + 10 * 16
    assert with_bias.digit_caps.bias is not None and torch.all(with_bias.digit_caps.bias == 0)
    no_decoder = reference_model(dataclasses.replace(PAPER, reconstruction=False))
    assert no_decoder.decoder is None
    assert count_parameters(no_decoder) == 8_215_568 - 1_411_344


def test_routing_weights_are_initialised_with_the_documented_scale():
    torch.manual_seed(0)
    weight = reference_model().digit_caps.weight.detach()
    assert weight.shape == (1152, 10, 16, 8)
    assert abs(weight.mean().item()) < 1e-4
    assert weight.std().item() == pytest.approx(0.01, rel=0.01)


# --- shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder_input", ["masked", "target"])
def test_forward_shapes_and_ranges(decoder_input):
    torch.manual_seed(0)
    model = reference_model(dataclasses.replace(PAPER, decoder_input=decoder_input))
    images = torch.rand(3, 1, 28, 28)
    labels = torch.tensor([1, 7, 3])
    out = model(images, labels)
    assert out.digit_caps.shape == (3, 10, 16)
    assert out.lengths.shape == (3, 10)
    assert torch.all(out.lengths >= 0) and torch.all(out.lengths < 1)  # squash keeps |v| < 1
    torch.testing.assert_close(out.lengths, out.digit_caps.norm(dim=-1))
    assert out.reconstructions.shape == (3, 1, 28, 28)
    assert torch.all(out.reconstructions >= 0) and torch.all(out.reconstructions <= 1)
    assert out.predictions.shape == (3,)


def test_larger_input_shape_gives_a_larger_capsule_grid():
    config = dataclasses.replace(PAPER, input_shape=(1, 36, 36), reconstruction=True)
    # 36 -> Conv1 28 -> PrimaryCaps (28 - 9) // 2 + 1 = 10: 32 * 10 * 10 capsules.
    assert config.primary_grid == (10, 10)
    assert config.num_primary_capsules == 3200
    model = CapsNet(config)
    assert model.digit_caps.weight.shape == (3200, 10, 16, 8)
    out = model(torch.rand(2, 1, 36, 36), torch.tensor([0, 1]))
    assert out.reconstructions.shape == (2, 1, 36, 36)


def test_number_of_classes_and_routing_iterations_are_configurable():
    config = dataclasses.replace(PAPER, num_classes=5, routing_iterations=1)
    model = CapsNet(config)
    out = model(torch.rand(2, 1, 28, 28), torch.tensor([0, 4]))
    assert out.lengths.shape == (2, 5)
    assert model.digit_caps.num_iterations == 1


# --- PrimaryCaps grouping -------------------------------------------------------------------------


class _FixedOutput(nn.Module):
    """Stands in for PrimaryCaps' convolution and returns a known tensor."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, _features):
        return self.output


def test_primary_capsules_take_components_from_channels_of_one_type_at_one_pixel():
    layer = PrimaryCaps()
    batch, types, dim, rows, cols = 2, 32, 8, 6, 6
    conv_out = torch.randn(batch, types * dim, rows, cols, dtype=torch.float64)
    layer.conv = _FixedOutput(conv_out)
    capsules = layer(torch.empty(0))
    assert capsules.shape == (batch, 1152, 8)

    # Capsule index = type * 36 + row * 6 + col; component k = conv channel type * 8 + k.
    expected = torch.empty(batch, 1152, dim, dtype=torch.float64)
    for capsule_type in range(types):
        for row in range(rows):
            for col in range(cols):
                channels = conv_out[:, capsule_type * dim : (capsule_type + 1) * dim, row, col]
                expected[:, capsule_type * rows * cols + row * cols + col] = channels
    torch.testing.assert_close(capsules, squash(expected), rtol=0, atol=1e-12)

    # The common bug, a plain view of the conv output, groups 8 neighbouring pixels of one
    # channel into a capsule; this test would catch it.
    wrong = squash(conv_out.reshape(batch, 1152, dim))
    assert not torch.allclose(capsules, wrong)


def test_primary_capsule_grid_of_real_convolution():
    layer = PrimaryCaps()
    capsules = layer(torch.randn(1, 256, 20, 20))
    assert layer.grid_size(20, 20) == (6, 6)
    assert capsules.shape == (1, 1152, 8)
    assert torch.all(capsules.norm(dim=-1) < 1)


# --- DigitCaps and routing wiring -----------------------------------------------------------------


def test_model_routes_primary_capsules_with_its_weights():
    torch.manual_seed(0)
    model = reference_model(dataclasses.replace(PAPER, capsule_bias=True))
    with torch.no_grad():
        model.digit_caps.bias.normal_(0, 0.1)
    images = torch.rand(2, 1, 28, 28)
    out = model(images, torch.tensor([0, 1]))
    primary = model.primary_caps(torch.relu(model.conv1(images)))
    expected = dynamic_routing_reference(primary, model.digit_caps.weight, model.digit_caps.bias, 3)
    torch.testing.assert_close(out.digit_caps, expected)


def test_every_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    model = reference_model(dataclasses.replace(PAPER, capsule_bias=True))
    out = model(torch.rand(2, 1, 28, 28), torch.tensor([2, 5]))
    (out.lengths.sum() + out.reconstructions.sum()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_routing_runs_in_float32_under_cpu_autocast():
    torch.manual_seed(0)
    model = reference_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 1, 28, 28), torch.tensor([0, 1]))
    assert out.digit_caps.dtype == torch.float32
    assert torch.isfinite(out.lengths).all()


def test_digit_caps_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        DigitCaps(1152, 8, 10, 16, backend="fast")


# --- decoder masking ------------------------------------------------------------------------------


def _capture_decoder_input(model: CapsNet) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []
    first_linear = model.decoder.net[0]
    first_linear.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].detach()))
    return captured


def test_masked_decoder_sees_only_the_selected_capsule_among_all_160_components():
    torch.manual_seed(0)
    model = reference_model()
    captured = _capture_decoder_input(model)
    labels = torch.tensor([4, 9])
    out = model(torch.rand(2, 1, 28, 28), labels)
    decoder_in = captured[0].view(2, 10, 16)
    for b, label in enumerate(labels.tolist()):
        torch.testing.assert_close(decoder_in[b, label], out.digit_caps[b, label].detach())
        others = torch.cat([decoder_in[b, :label], decoder_in[b, label + 1 :]])
        assert torch.all(others == 0)


def test_target_decoder_sees_the_selected_capsules_16_components():
    torch.manual_seed(0)
    model = reference_model(dataclasses.replace(PAPER, decoder_input="target"))
    captured = _capture_decoder_input(model)
    labels = torch.tensor([3, 0])
    out = model(torch.rand(2, 1, 28, 28), labels)
    torch.testing.assert_close(captured[0], out.digit_caps[torch.arange(2), labels].detach())


def test_training_masks_with_labels_and_evaluation_with_predictions():
    torch.manual_seed(0)
    model = reference_model()
    images = torch.rand(4, 1, 28, 28)
    labels = torch.tensor([0, 1, 2, 3])
    model.train()
    assert torch.equal(model(images, labels).reconstructed_class, labels)
    model.eval()
    out = model(images, labels)
    assert torch.equal(out.reconstructed_class, out.lengths.argmax(dim=1))
    assert torch.equal(model(images, labels, mask="true").reconstructed_class, labels)
    assert model(images).reconstructions.shape == (4, 1, 28, 28)  # no labels needed


def test_training_mode_without_labels_is_a_clear_error():
    model = reference_model().train()
    with pytest.raises(ValueError, match="labels is required"):
        model(torch.rand(1, 1, 28, 28))


def test_decoder_rejects_unknown_input_mode():
    with pytest.raises(ValueError, match="decoder_input"):
        ReconstructionDecoder(decoder_input="all")


# --- bad input and configuration ------------------------------------------------------------------


def test_bad_images_and_labels_name_the_argument():
    model = reference_model()
    with pytest.raises(ValueError, match=r"images must have shape \[B, 1, 28, 28\]"):
        model(torch.rand(2, 28, 28))
    with pytest.raises(TypeError, match="images must be floating point"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(TypeError, match="labels must be int64"):
        model(torch.rand(2, 1, 28, 28), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels must be a 1-D tensor of 2"):
        model(torch.rand(2, 1, 28, 28), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 10\)"):
        model(torch.rand(2, 1, 28, 28), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="mask must be one of"):
        model(torch.rand(2, 1, 28, 28), mask="label")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"routing_iterations": 0}, "routing_iterations"),
        ({"num_classes": 1.5}, "num_classes"),
        ({"weight_init_std": float("inf")}, "weight_init_std"),
        ({"capsule_bias": 1}, "capsule_bias"),
        ({"decoder_input": "all"}, "decoder_input"),
        ({"input_shape": (1, 16, 16)}, "too small"),
        ({"input_shape": (28, 28)}, "input_shape"),
        ({"weight_init_std": 0.0}, "weight_init_std"),
    ],
)
def test_invalid_config_is_rejected_with_the_field_name(override, message):
    with pytest.raises(ConfigFieldError, match=message) as info:
        CapsNetConfig(**override)
    assert info.value.field == message if message != "too small" else "input_shape"


def test_config_round_trips_through_a_plain_dict():
    config = CapsNetConfig(input_shape=(1, 36, 36), capsule_bias=True, decoder_input="target")
    values = config.to_dict()
    assert values["input_shape"] == [1, 36, 36]
    assert CapsNetConfig.from_dict(values) == config
    with pytest.raises(ConfigFieldError, match=r"dropout is not a CapsNetConfig field \(unknown fields \[.dropout.\]"):
        CapsNetConfig.from_dict({**values, "dropout": 0.5})


def test_switching_the_routing_backend_keeps_the_weights_and_the_outputs():
    torch.manual_seed(0)
    model = reference_model()
    images, labels = torch.rand(2, 1, 28, 28, dtype=torch.float64), torch.tensor([3, 8])
    model = model.double()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    reference_out = model(images, labels)
    model.routing_backend = "fused"
    assert model.digit_caps.backend == "fused" and model.routing_backend == "fused"
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"{name} changed when the backend changed"
    fused_out = model(images, labels)
    torch.testing.assert_close(fused_out.digit_caps, reference_out.digit_caps, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        fused_out.reconstructions, reference_out.reconstructions, rtol=1e-10, atol=1e-12
    )
    with pytest.raises(ValueError, match="routing_backend"):
        model.routing_backend = "gpu"


def test_routing_backend_is_not_part_of_the_architecture():
    assert "routing_backend" not in CapsNetConfig().to_dict()
    assert CapsNet(PAPER, routing_backend="reference").config == CapsNet(PAPER).config
    with pytest.raises(ValueError, match="routing_backend must be one of"):
        CapsNet(PAPER, routing_backend="cuda")


# --- unusual devices and compilers ----------------------------------------------------------------


def test_model_runs_on_the_meta_device():
    # Shapes without memory or arithmetic: how large models are planned and sharded.
    model = CapsNet(PAPER, routing_backend="reference").to("meta")
    images = torch.empty(4, 1, 28, 28, device="meta")
    labels = torch.empty(4, dtype=torch.long, device="meta")
    out = model(images, labels)
    assert out.digit_caps.shape == (4, 10, 16) and out.digit_caps.device.type == "meta"
    assert out.reconstructions.shape == (4, 1, 28, 28)
    terms = capsnet_loss(out, images, labels)
    assert terms.total.shape == () and terms.total.device.type == "meta"


SMALL = CapsNetConfig(conv1_channels=16, primary_types=4, decoder_hidden=(32, 64))


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_a_training_step_compiles_as_one_graph(backend):
    # fullgraph=True fails on any graph break: a data-dependent check such as
    # int(labels.min()) in the forward would be one.
    if backend == "fused":
        _extension.require_kernel("cpu", torch.float32)
    torch.manual_seed(0)
    model = CapsNet(SMALL, routing_backend=backend)
    images, labels = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 9])

    def loss_of(model, images, labels):
        return capsnet_loss(model(images, labels), images, labels).total

    expected = loss_of(model, images, labels)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    loss = compiled(model, images, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for (name, _), grad, expected_grad in zip(model.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6, msg=name)


def test_out_of_range_labels_are_still_rejected_in_eager_mode_on_the_cpu():
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 10\), got values from -1"):
        reference_model(SMALL)(torch.rand(2, 1, 28, 28), torch.tensor([-1, 3]))


# --- the core package -----------------------------------------------------------------------------

CORE_WITHOUT_TRAINING_DEPENDENCIES = """
import importlib, pkgutil, sys
blocked = ("numpy", "torchvision", "tqdm", "matplotlib", "tensorboard")

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"{name} is blocked: the core package must not need it")

sys.meta_path.insert(0, Block())
import capsnet
core = [m.name for m in pkgutil.iter_modules(capsnet.__path__, "capsnet.")
        if m.name not in ("capsnet.training", "capsnet.datasets")]
for name in core:
    importlib.import_module(name)
model = capsnet.CapsNet(capsnet.CapsNetConfig(), routing_backend="reference").eval()
out = model(__import__("torch").rand(2, 1, 28, 28))
print("imported", len(core), "core modules;", tuple(out.lengths.shape))
"""


def test_core_package_needs_no_training_dependencies():
    # torch itself imports numpy when it can, so the check blocks it on purpose: everything
    # under capsnet/ but training/ and datasets/ must work without numpy, torchvision,
    # tqdm, matplotlib and tensorboard.
    result = subprocess.run(
        [sys.executable, "-c", CORE_WITHOUT_TRAINING_DEPENDENCIES],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(2, 10)" in result.stdout

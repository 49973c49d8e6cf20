"""Training under CPU bfloat16 autocast: small convolutions guarded, losses in float32, and a
CPU without fast bfloat16 kernels training in float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sap_lightning.backbones import create_backbone
from sap_lightning.config.schema import LossConfig
from sap_lightning.core import mixed_precision
from sap_lightning.core.mixed_precision import (
    GuardedConv3d,
    guard_small_convolutions,
    training_precision,
)
from sap_lightning.modules.losses import (
    create_loss,
    loss_in_float32,
    nt_xent_loss,
    reconstruction_loss,
    rotation_loss,
)
from sap_lightning.modules.mae import masked_mse

needs_bf16_kernels = pytest.mark.skipif(
    not mixed_precision.cpu_has_fast_kernels("bf16-mixed"),
    reason="this CPU has no fast bf16 kernels",
)


def test_guarding_keeps_the_weights_keys_and_type() -> None:
    net = create_backbone("unet_tiny", in_channels=2, out_channels=3)
    before = {key: value.clone() for key, value in net.state_dict().items()}
    plain = sum(type(m) is nn.Conv3d for m in net.modules())
    transposed = sum(isinstance(m, nn.ConvTranspose3d) for m in net.modules())

    assert guard_small_convolutions(net) == plain > 0
    assert guard_small_convolutions(net) == 0  # already guarded
    assert sum(type(m) is GuardedConv3d for m in net.modules()) == plain
    assert sum(isinstance(m, nn.ConvTranspose3d) for m in net.modules()) == transposed
    after = net.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value)


def test_a_guarded_convolution_runs_small_inputs_in_float32_only_while_training() -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 4, 3, padding=1)
    reference = nn.Conv3d(4, 4, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    guard_small_convolutions(conv)
    shallow, deep = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 4, 4, 4, 4)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(shallow).dtype == torch.float32  # guarded: a 2-voxel axis
        assert conv(deep).dtype == torch.bfloat16  # everything else keeps bfloat16
        with torch.no_grad():
            assert conv(shallow).dtype == torch.bfloat16  # inference is left as it is
    # Outside autocast it is exactly nn.Conv3d.
    for x in (shallow, deep):
        assert torch.equal(conv(x), reference(x))


@needs_bf16_kernels
def test_guarded_weight_gradients_of_a_two_deep_input_are_finite_and_float32s() -> None:
    """oneDNN's bfloat16 weight gradient for this shape was NaN in about one call in five
    (the module docstring); guarded, every call equals the float32 gradient."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv3d(64, 64, 3, padding=1)
    guard_small_convolutions(conv)
    for _ in range(50):
        x = torch.randn(2, 64, 2, 2, 2, generator=generator)
        upstream = torch.randn(2, 64, 2, 2, 2, generator=generator)
        conv.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        out.backward(upstream)
        weight = conv.weight.detach().clone().requires_grad_(True)
        F.conv3d(x, weight, conv.bias.detach(), padding=1).backward(upstream)
        assert torch.isfinite(conv.weight.grad).all()
        torch.testing.assert_close(conv.weight.grad, weight.grad)


@pytest.mark.parametrize(
    ("precision", "accelerator", "fast", "expected"),
    [
        ("bf16-mixed", "cpu", True, "bf16-mixed"),
        ("bf16-mixed", "cpu", False, "32-true"),
        ("16-mixed", "cpu", False, "32-true"),
        ("bf16-mixed", "gpu", False, "bf16-mixed"),  # GPUs: Lightning and torch decide
        ("32-true", "cpu", False, "32-true"),
        ("bf16-true", "cpu", False, "bf16-true"),  # not an autocast: left to Lightning
    ],
)
def test_a_cpu_without_fast_kernels_trains_in_float32(
    monkeypatch, caplog, precision, accelerator, fast, expected
) -> None:
    monkeypatch.setattr(mixed_precision, "_cpu_supports", lambda dtype: fast)
    mixed_precision._warn_float32_training.cache_clear()
    with caplog.at_level("WARNING"):
        assert training_precision(precision, accelerator) == expected
        assert training_precision(precision, accelerator) == expected
    warned = [
        r.getMessage() for r in caplog.records if "training runs in float32" in r.getMessage()
    ]
    assert warned == (
        []
        if expected == precision
        else [f"this CPU has no fast kernels for {precision}: training runs in float32"]
    )


def test_losses_are_float32_under_bf16_autocast() -> None:
    """Every loss of a training step is float32 under autocast, and equals its value computed
    outside autocast from the same (bfloat16-rounded) network outputs."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, 6, 6, 6, generator=generator).bfloat16()
    labels = torch.randint(0, 2, (2, 1, 6, 6, 6), generator=generator)
    z_a, z_b = torch.randn(4, 32, generator=generator), torch.randn(4, 32, generator=generator)
    rotation = torch.randn(8, 4, generator=generator).bfloat16()
    classes = torch.randint(0, 4, (8,), generator=generator)
    image = torch.randn(2, 2, 6, 6, 6, generator=generator)
    mask = (torch.rand(2, 1, 6, 6, 6, generator=generator) > 0.5).float()
    loss_fn = create_loss(LossConfig(name="batch_dice_ce"))

    def every_loss() -> list[torch.Tensor]:
        return [
            loss_in_float32(loss_fn, logits, labels),
            nt_xent_loss(z_a, z_b, temperature=0.1, gather=None),
            rotation_loss(rotation, classes),
            reconstruction_loss(logits, image),
            masked_mse(logits, image, mask),
        ]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = every_loss()
    plain = every_loss()
    for got, expected in zip(under_autocast, plain):
        assert got.dtype == torch.float32
        assert torch.equal(got, expected)
    assert torch.equal(plain[0], loss_fn(logits.float(), labels))

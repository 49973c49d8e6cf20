"""A MONAI BasicUNet small enough for CPU tests and the demo (about 0.88 M parameters).

Its widths (8, 16, 32, 64, 64, 16) double MONAI's smallest useful ones (4, 8, 16, 32, 64, 8) at
full resolution and in the last decoder stage and keep the 64-channel bottleneck (the SSL heads'
input size): on the demo's stage 1 the wider full-resolution and last decoder stages raised the
held-out Dice most, for 1.2x the time per step (docs/method.md, "CPU recipe"). Tests pass
smaller widths.

Encoder: the first double convolution and the four downsampling stages; decoder: the four
upsampling stages; head: the final 1x1x1 convolution.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import BasicUNet
from torch import nn

from sap_lightning.backbones.registry import BackboneSpec, register_backbone
from sap_lightning.core.errors import ConfigError

_ENCODER_STAGES = ("conv_0", "down_1", "down_2", "down_3", "down_4")
# BasicUNet max-pools four times.
_TOTAL_STRIDE = 16


def basic_unet_bottleneck(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of ``down_4``, the deepest encoder stage of BasicUNet."""
    for stage in _ENCODER_STAGES:
        x = getattr(model, stage)(x)
    return x


SPEC = BackboneSpec(
    encoder_prefixes=tuple(f"{stage}." for stage in _ENCODER_STAGES),
    input_projection_keys=("conv_0.conv_0.conv.weight",),
    head_keys=("final_conv.weight", "final_conv.bias"),
    bottleneck=basic_unet_bottleneck,
    bottleneck_channels_fn=lambda kw: kw["features"][4],
    bottleneck_stride_fn=lambda kw: _TOTAL_STRIDE,
    input_multiple_fn=lambda kw: _TOTAL_STRIDE,
    default_kwargs={
        "features": (8, 16, 32, 64, 64, 16),
        "act": ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        "norm": ("instance", {"affine": True}),
        "bias": True,
        "dropout": 0.0,
        "upsample": "deconv",
        "spatial_dims": 3,
    },
    description="MONAI BasicUNet, tiny widths for CPU tests and demos",
)


@register_backbone("unet_tiny", SPEC)
def build_unet_tiny(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    if len(kwargs["features"]) != 6:
        raise ConfigError(
            f"unet_tiny: features needs 6 widths (5 encoder stages + the last decoder stage), "
            f"got {list(kwargs['features'])}"
        )
    return BasicUNet(in_channels=in_channels, out_channels=out_channels, **kwargs)

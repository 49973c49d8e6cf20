"""MONAI SegResNet (Myronenko 2018) with the MONAI BraTS tutorial's width (16 initial filters).

Encoder: the initial convolution and the downsampling stages; decoder: the upsampling stages
and the normalisation before the output; head: the final 1x1x1 convolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import SegResNet
from torch import nn

from sap_lightning.backbones.registry import BackboneSpec, register_backbone
from sap_lightning.core.errors import ConfigError


def _total_stride(kw: Mapping[str, Any]) -> int:
    # Every encoder stage after the first halves the resolution.
    return 2 ** (len(kw["blocks_down"]) - 1)


def segresnet_bottleneck(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of the deepest encoder stage, computed by SegResNet's own ``encode``."""
    return model.encode(x)[0]


SPEC = BackboneSpec(
    encoder_prefixes=("convInit.", "down_layers."),
    input_projection_keys=("convInit.conv.weight",),
    head_keys=("conv_final.2.conv.weight", "conv_final.2.conv.bias"),
    bottleneck=segresnet_bottleneck,
    bottleneck_channels_fn=lambda kw: kw["init_filters"] * _total_stride(kw),
    bottleneck_stride_fn=_total_stride,
    input_multiple_fn=_total_stride,
    default_kwargs={
        "init_filters": 16,
        "blocks_down": (1, 2, 2, 4),
        "blocks_up": (1, 1, 1),
        "dropout_prob": None,
        "act": ("RELU", {"inplace": True}),
        "norm": ("GROUP", {"num_groups": 8}),
        "upsample_mode": "nontrainable",
        "spatial_dims": 3,
    },
    description="MONAI SegResNet (Myronenko 2018)",
)


@register_backbone("segresnet", SPEC)
def build_segresnet(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    if len(kwargs["blocks_up"]) != len(kwargs["blocks_down"]) - 1:
        raise ConfigError(
            f"segresnet: blocks_up needs one entry fewer than blocks_down, got "
            f"blocks_down={list(kwargs['blocks_down'])}, blocks_up={list(kwargs['blocks_up'])}"
        )
    return SegResNet(in_channels=in_channels, out_channels=out_channels, **kwargs)

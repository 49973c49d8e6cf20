"""MONAI DynUNet with nnU-Net-like defaults: 3x3x3 kernels, five stride-2 stages, 32..320 filters.

Encoder: the input block, the downsampling blocks and the bottleneck block; decoder: the
upsampling blocks; head: the final 1x1x1 output block (plus the deep-supervision heads when
``deep_supervision`` is on, which is off by default so ``forward`` returns one logits tensor).

DynUNet registers every block twice (``input_block.*`` is also ``skip_layers.downsample.*``, and
so on down the recursive ``skip_layers``); the spec names the first, canonical names and weight
transfer resolves the aliases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import DynUNet
from torch import nn

from sap_lightning.backbones.registry import BackboneSpec, register_backbone
from sap_lightning.core.errors import ConfigError


def nnunet_filters(num_stages: int, spatial_dims: int) -> list[int]:
    """nnU-Net's filter rule, as MONAI DynUNet applies it when ``filters`` is None."""
    cap = 320 if spatial_dims == 3 else 512
    return [min(2 ** (5 + i), cap) for i in range(num_stages)]


def _filters(kw: Mapping[str, Any]) -> list[int]:
    num_stages = len(kw["strides"])
    if kw["filters"] is None:
        return nnunet_filters(num_stages, kw["spatial_dims"])
    return list(kw["filters"])[:num_stages]


def _stride_per_axis(kw: Mapping[str, Any]) -> list[int]:
    """Product of all strides along each spatial axis (strides may be per-axis sequences)."""
    dims = kw["spatial_dims"]
    totals = [1] * dims
    for stride in kw["strides"]:
        per_axis = [stride] * dims if isinstance(stride, int) else list(stride)
        totals = [t * s for t, s in zip(totals, per_axis)]
    return totals


def _total_stride(kw: Mapping[str, Any]) -> int:
    # With anisotropic strides the per-axis factors differ; their least common multiple is a
    # size that is valid along every axis.
    return math.lcm(*_stride_per_axis(kw))


def dynunet_bottleneck(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of DynUNet's bottleneck block: the encoder path of ``skip_layers`` without skips."""
    x = model.input_block(x)
    for down in model.downsamples:
        x = down(x)
    return model.bottleneck(x)


SPEC = BackboneSpec(
    encoder_prefixes=("input_block.", "downsamples.", "bottleneck."),
    input_projection_keys=(
        "input_block.conv1.conv.weight",
        # Only with res_block=True: the 1x1x1 residual projection of the input block.
        "input_block.conv3.conv.weight",
    ),
    head_keys=("output_block.conv.conv.weight", "output_block.conv.conv.bias"),
    auxiliary_head_prefixes=("deep_supervision_heads.",),
    deep_supervision_kwarg="deep_supervision",
    bottleneck=dynunet_bottleneck,
    bottleneck_channels_fn=lambda kw: _filters(kw)[-1],
    bottleneck_stride_fn=_total_stride,
    input_multiple_fn=_total_stride,
    default_kwargs={
        "kernel_size": (3, 3, 3, 3, 3, 3),
        "strides": (1, 2, 2, 2, 2, 2),
        "filters": None,
        "dropout": None,
        "norm_name": ("INSTANCE", {"affine": True}),
        "act_name": ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        "deep_supervision": False,
        "deep_supr_num": 1,
        "res_block": False,
        "trans_bias": False,
        "spatial_dims": 3,
    },
    description="MONAI DynUNet, nnU-Net-like configuration (Isensee et al. 2021)",
)


@register_backbone("dynunet", SPEC)
def build_dynunet(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    strides: Sequence = kwargs["strides"]
    if len(kwargs["kernel_size"]) != len(strides):
        raise ConfigError(
            f"dynunet: kernel_size has {len(kwargs['kernel_size'])} entries but strides has "
            f"{len(strides)}; give one kernel size per stage"
        )
    # The transposed convolutions undo the strides, so their kernels are the strides themselves.
    return DynUNet(
        in_channels=in_channels,
        out_channels=out_channels,
        upsample_kernel_size=tuple(strides[1:]),
        **kwargs,
    )

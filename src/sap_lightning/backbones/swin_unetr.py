"""MONAI Swin UNETR (v1), the paper's network: feature size 48, dropouts 0.1, about 62 M parameters.

"Encoder" follows the authors' code: the Swin transformer (``swinViT``) plus the convolutional
encoder blocks on the skip paths (``encoder1..4``, ``encoder10``); the rest but the output
layer is decoder. MONAI >= 1.5 no longer accepts ``img_size``, so it is never passed.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from sap_lightning.backbones.registry import BackboneSpec, register_backbone

# Swin UNETR embeds 2^3 patches and then merges patches four times: 2 * 2^4 = 32.
_TOTAL_STRIDE = 32


def swin_bottleneck(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of the last Swin stage (16 x feature_size channels at 1/32 resolution).

    ``swinViT`` returns the patch embedding and the four stage outputs; index 4 is the deepest,
    normalised exactly as in ``SwinUNETR.forward`` (the features the SSL heads of Tang et al. use).
    """
    return model.swinViT(x, model.normalize)[4]


SPEC = BackboneSpec(
    encoder_prefixes=(
        "swinViT.",
        "encoder1.",
        "encoder2.",
        "encoder3.",
        "encoder4.",
        "encoder10.",
    ),
    input_projection_keys=(
        "swinViT.patch_embed.proj.weight",
        "encoder1.layer.conv1.conv.weight",
        # 1x1x1 residual projection of the full-resolution skip block (input -> feature_size).
        "encoder1.layer.conv3.conv.weight",
    ),
    head_keys=("out.conv.conv.weight", "out.conv.conv.bias"),
    bottleneck=swin_bottleneck,
    bottleneck_channels_fn=lambda kw: 16 * kw["feature_size"],
    bottleneck_stride_fn=lambda kw: _TOTAL_STRIDE,
    input_multiple_fn=lambda kw: _TOTAL_STRIDE,
    default_kwargs={
        "feature_size": 48,
        "depths": (2, 2, 2, 2),
        "num_heads": (3, 6, 12, 24),
        # Attention windows of 7^3 tokens (MONAI's and Tang et al.'s); smaller windows make the
        # attention cheaper for CPU tests.
        "window_size": 7,
        "drop_rate": 0.1,
        "attn_drop_rate": 0.1,
        "dropout_path_rate": 0.1,
        "norm_name": "instance",
        "normalize": True,
        "use_checkpoint": False,
        "use_v2": False,
        "spatial_dims": 3,
    },
    description="MONAI SwinUNETR v1 (Hatamizadeh et al. 2022), the paper's network",
)


@register_backbone("swin_unetr", SPEC)
def build_swin_unetr(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, **kwargs)

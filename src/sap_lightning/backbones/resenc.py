"""nnU-Net's residual-encoder U-Net (ResEnc, Isensee et al., "nnU-Net Revisited", MICCAI 2024).

The network is ``ResidualEncoderUNet`` of ``dynamic-network-architectures`` (the package nnU-Net
and nnssl build their networks from), so state-dict keys are nnU-Net's own (``encoder.*``,
``decoder.*``). The defaults are the ResEnc-M/L presets' 3D architecture as nnU-Net's planner
(``nnunetv2/experiment_planning/experiment_planners/residual_unets/
residual_encoder_unet_planners.py``) builds it for an isotropic patch of 128^3 or more: six
stages of 32, 64, 128, 256, 320, 320 features (32 * 2^i capped at 320), 1, 3, 4, 6, 6, 6 residual
blocks (BasicBlockD) per encoder stage, one convolution per decoder stage, 3x3x3 kernels, stride
2 from the second stage, instance norm (eps 1e-5, affine), LeakyReLU and conv bias. M and L do
not differ in architecture: their GPU-memory targets (8 GB vs 24 GB) only pick a larger patch
and batch (``data.patch_size`` / ``data.batch_size``; more stages only for patches whose
edge allows another halving to at least 4 voxels). The planner adapts kernels and strides to
anisotropic spacings; pass ``kernel_sizes`` and ``strides`` per stage for that.

Encoder: ``encoder.*`` (stem and stages; the decoder holds the same modules again under
``decoder.encoder.*``, aliases that weight transfer resolves). Decoder: transposed convolutions
and decoder stages. Head: the last segmentation layer, registered once more as ``head`` so its
key does not depend on the number of stages. With ``deep_supervision`` off (the default) the
unused lower-resolution segmentation layers are dropped, so every parameter is trained; with it
on, training returns the outputs upsampled to the input size and stacked on dim 1 (as MONAI
DynUNet does), the lower-resolution layers count as auxiliary heads.

``dynamic-network-architectures`` is imported when a ResEnc network is built. Its wheel
declares ``timm``, which pulls a CUDA ``torchvision`` (and, unpinned, another torch) into a
CPU-only environment; the ResEnc U-Net needs only torch and numpy, so install it with
``pip install --no-deps 'dynamic-network-architectures>=0.4.4,<0.5'`` there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sap_lightning.backbones.registry import BackboneSpec, register_backbone
from sap_lightning.core.errors import ConfigError

INSTALL_HINT = "pip install --no-deps 'dynamic-network-architectures>=0.4.4,<0.5'"

RESENC_ML_3D: dict[str, Any] = {
    "features_per_stage": (32, 64, 128, 256, 320, 320),
    "n_blocks_per_stage": (1, 3, 4, 6, 6, 6),
    "n_conv_per_stage_decoder": (1, 1, 1, 1, 1),
    "kernel_sizes": (3, 3, 3, 3, 3, 3),
    "strides": (1, 2, 2, 2, 2, 2),
}
"""nnU-Net ResEnc-M / ResEnc-L 3D architecture for isotropic patches of 128^3 to 255^3."""


def _per_axis(value: int | Sequence[int]) -> list[int]:
    return [int(value)] * 3 if isinstance(value, int) else [int(v) for v in value]


def _stride_per_axis(kw: Mapping[str, Any]) -> list[int]:
    totals = [1, 1, 1]
    for stride in kw["strides"]:
        totals = [t * s for t, s in zip(totals, _per_axis(stride))]
    return totals


def _total_stride(kw: Mapping[str, Any]) -> int:
    return math.lcm(*_stride_per_axis(kw))


def resenc_bottleneck(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The deepest encoder stage's output (the encoder returns every stage's features)."""
    return model.encoder(x)[-1]


@functools.cache
def _network_class() -> type[nn.Module]:
    """``ResidualEncoderUNet`` with a fixed head name and stacked deep supervision."""
    try:
        from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    except ImportError as err:
        raise ConfigError(
            f"backbone 'resenc_unet' needs dynamic-network-architectures ({err}); {INSTALL_HINT}"
        ) from err

    class ResEncUNet(ResidualEncoderUNet):
        """nnU-Net's ResidualEncoderUNet; ``head`` aliases the final segmentation layer."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            layers = self.decoder.seg_layers
            if not self.decoder.deep_supervision:
                # Only the last layer is used without deep supervision: no untrained weights.
                for index in range(len(layers) - 1):
                    layers[index] = nn.Identity()
            self.head = layers[-1]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            if not isinstance(out, list | tuple):
                return out
            if not self.training:
                return out[0]
            size = out[0].shape[2:]
            return torch.stack(
                [o if o.shape[2:] == size else F.interpolate(o, size) for o in out], 1
            )

    return ResEncUNet


SPEC = BackboneSpec(
    encoder_prefixes=("encoder.",),
    input_projection_keys=("encoder.stem.convs.0.conv.weight",),
    head_keys=("head.weight", "head.bias"),
    auxiliary_head_prefixes=("decoder.seg_layers.",),
    deep_supervision_kwarg="deep_supervision",
    bottleneck=resenc_bottleneck,
    bottleneck_channels_fn=lambda kw: int(kw["features_per_stage"][-1]),
    bottleneck_stride_fn=_total_stride,
    input_multiple_fn=_total_stride,
    default_kwargs={**RESENC_ML_3D, "deep_supervision": False},
    description="nnU-Net residual-encoder U-Net, ResEnc-M/L 3D presets (Isensee et al. 2024)",
)


@register_backbone("resenc_unet", SPEC)
def build_resenc_unet(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    n_stages = len(kwargs["features_per_stage"])
    lengths = {
        "n_blocks_per_stage": (len(kwargs["n_blocks_per_stage"]), n_stages),
        "kernel_sizes": (len(kwargs["kernel_sizes"]), n_stages),
        "strides": (len(kwargs["strides"]), n_stages),
        "n_conv_per_stage_decoder": (len(kwargs["n_conv_per_stage_decoder"]), n_stages - 1),
    }
    for key, (got, wanted) in lengths.items():
        if got != wanted:
            raise ConfigError(
                f"resenc_unet: {key} has {got} entries, needs {wanted} for "
                f"{n_stages} stages (features_per_stage {list(kwargs['features_per_stage'])})"
            )
    net = _network_class()(
        input_channels=in_channels,
        n_stages=n_stages,
        features_per_stage=[int(f) for f in kwargs["features_per_stage"]],
        conv_op=nn.Conv3d,
        kernel_sizes=[_per_axis(k) for k in kwargs["kernel_sizes"]],
        strides=[_per_axis(s) for s in kwargs["strides"]],
        n_blocks_per_stage=[int(n) for n in kwargs["n_blocks_per_stage"]],
        num_classes=out_channels,
        n_conv_per_stage_decoder=[int(n) for n in kwargs["n_conv_per_stage_decoder"]],
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=None,
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=bool(kwargs["deep_supervision"]),
    )
    # nnU-Net's initialisation (get_network_from_plans): He init, last norm of each block at 0.
    net.apply(net.initialize)
    return net

"""Registered segmentation backbones and their weight-layout specs.

>>> from sap_lightning.backbones import create_backbone, get_spec, list_backbones
>>> net = create_backbone("unet_tiny", in_channels=2, out_channels=10)
>>> get_spec("swin_unetr").bottleneck_channels()  # feature_size 48
768

Importing this package registers the built-ins: ``swin_unetr``, ``dynunet``, ``segresnet`` and
``unet_tiny``, and ``resenc_unet`` (built with dynamic-network-architectures when installed).
"""

from sap_lightning.backbones import dynunet, resenc, segresnet, swin_unetr, unet_tiny  # noqa: F401
from sap_lightning.backbones.registry import (
    BackboneSpec,
    create_backbone,
    get_spec,
    in_memory_format,
    list_backbones,
    register_backbone,
    resolve_spec,
)

__all__ = [
    "BackboneSpec",
    "create_backbone",
    "get_spec",
    "in_memory_format",
    "list_backbones",
    "register_backbone",
    "resolve_spec",
]

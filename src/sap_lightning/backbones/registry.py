"""Backbone registry: every network the library can train, with a declarative weight-layout spec.

A backbone is a factory ``fn(in_channels, out_channels, **kwargs) -> nn.Module`` registered
under a name with a :class:`BackboneSpec`. The spec says which state-dict keys form the
encoder, the input projection and the output head, so weight transfer (SAP: all but the head,
SSL: encoder only), differential learning rates and the SSL heads work the same way for every
architecture, without name guessing at the call site (the pattern of timm's ``first_conv`` /
``classifier`` and nnU-Net's architecture plans).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from sap_lightning.core.errors import ConfigError

BackboneFactory = Callable[..., nn.Module]
BottleneckFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
KwargsRule = Callable[[Mapping[str, Any]], int]


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one spec per backbone
class BackboneSpec:
    """How a registered backbone's weights are laid out and where its bottleneck is.

    Key names are canonical state-dict names of the network itself (no ``net.`` or ``module.``
    prefix). The ``*_fn`` rules receive the *resolved* kwargs (defaults merged with the user's);
    call them through the methods of the same name without ``_fn``, which resolve for you.
    """

    encoder_prefixes: tuple[str, ...]
    """State-dict key prefixes of the encoder (what SSL pretraining transfers)."""
    input_projection_keys: tuple[str, ...]
    """Weights applied directly to the input image (dim 1 = input channels); adapted when the
    number of input channels changes between pretraining and fine-tuning. A key may exist
    only in some configurations (a residual 1x1x1 projection); where absent it is ignored."""
    head_keys: tuple[str, ...]
    """Final 1x1x1 output layer weight and bias (dim 0 = output channels); never transferred
    by SAP because the label set changes."""
    bottleneck: BottleneckFn
    """``bottleneck(model, x)`` -> deepest encoder features (B, C, *spatial) for the SSL heads."""
    bottleneck_channels_fn: KwargsRule
    bottleneck_stride_fn: KwargsRule
    """Total downsampling factor from the input to the bottleneck features."""
    input_multiple_fn: KwargsRule
    """Every spatial input size must be a multiple of this. With instance normalisation the
    bottleneck also needs more than one voxel in training, so one axis at least twice that."""
    default_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Every keyword the factory accepts, with its default; other keywords are refused."""
    deep_supervision_kwarg: str | None = None
    """Name of the kwarg that switches deep supervision on, if the backbone has it."""
    auxiliary_head_prefixes: tuple[str, ...] = ()
    """Further output layers (deep-supervision heads): class-specific, treated like the head."""
    description: str = ""

    def __post_init__(self) -> None:
        # A read-only view, so a caller cannot change the defaults of every later build.
        object.__setattr__(self, "default_kwargs", MappingProxyType(dict(self.default_kwargs)))

    def resolve_kwargs(self, kwargs: Mapping[str, Any] | None = None, name: str = "") -> dict:
        """Defaults overridden by ``kwargs``; an unknown keyword raises naming the valid ones."""
        kwargs = dict(kwargs or {})
        unknown = sorted(set(kwargs) - set(self.default_kwargs))
        if unknown:
            label = f"backbone {name!r}" if name else "this backbone"
            raise ConfigError(
                f"unknown keyword argument(s) {unknown} for {label}; "
                f"valid: {sorted(self.default_kwargs)}"
            )
        return {**self.default_kwargs, **kwargs}

    def bottleneck_channels(self, kwargs: Mapping[str, Any] | None = None) -> int:
        """Channel count of :attr:`bottleneck`'s output for these kwargs."""
        return int(self.bottleneck_channels_fn(self.resolve_kwargs(kwargs)))

    def bottleneck_stride(self, kwargs: Mapping[str, Any] | None = None) -> int:
        """Downsampling factor of the bottleneck (the SSL reconstruction decoder upsamples by it)."""
        return int(self.bottleneck_stride_fn(self.resolve_kwargs(kwargs)))

    def input_multiple(self, kwargs: Mapping[str, Any] | None = None) -> int:
        """Every spatial input size (patch, sliding window) must be a multiple of this.

        Instance normalisation needs more than one bottleneck voxel, so the smallest usable
        patch is this multiple along two axes and twice it along the third (e.g. 32x32x64).
        """
        return int(self.input_multiple_fn(self.resolve_kwargs(kwargs)))

    def deep_supervision(self, kwargs: Mapping[str, Any] | None = None) -> bool:
        """Whether the network returns stacked deep-supervision outputs in training mode."""
        if self.deep_supervision_kwarg is None:
            return False
        return bool(self.resolve_kwargs(kwargs)[self.deep_supervision_kwarg])

    def is_encoder_key(self, key: str) -> bool:
        return key.startswith(self.encoder_prefixes)

    def is_head_key(self, key: str) -> bool:
        """The final output layer or a deep-supervision head: the class-specific layers."""
        return key in self.head_keys or (
            bool(self.auxiliary_head_prefixes) and key.startswith(self.auxiliary_head_prefixes)
        )


@dataclass(frozen=True)
class _Entry:
    factory: BackboneFactory
    spec: BackboneSpec


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    name: str, spec: BackboneSpec
) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering ``fn(in_channels, out_channels, **kwargs) -> nn.Module`` as ``name``.

    The factory always receives the resolved kwargs (every key of ``spec.default_kwargs``).
    Registering a name twice raises, so a plugin cannot silently replace a built-in.
    """

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = _Entry(factory=factory, spec=spec)
        return factory

    return decorator


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; available: {list_backbones()}") from None


def get_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of a registered backbone (``ConfigError`` if unknown)."""
    return _entry(name).spec


def resolve_spec(spec: BackboneSpec | str) -> BackboneSpec:
    """Accept a spec or a backbone name wherever a spec is needed."""
    return spec if isinstance(spec, BackboneSpec) else get_spec(spec)


def in_memory_format(net: nn.Module, channels_last: bool) -> nn.Module:
    """``net`` with its 5-D weights in the channels-last 3D layout when ``channels_last``
    (``model.channels_last``); a convolution then gives channels-last activations whatever
    the input's layout, so batches need no conversion."""
    return net.to(memory_format=torch.channels_last_3d) if channels_last else net


def create_backbone(name: str, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    """Build backbone ``name``; unknown names or keywords raise ``ConfigError`` listing valid ones."""
    entry = _entry(name)
    resolved = entry.spec.resolve_kwargs(kwargs, name=name)
    return entry.factory(int(in_channels), int(out_channels), **resolved)

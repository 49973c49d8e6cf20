"""Optimisers by name (``optim.optimizer``): a registry like the backbones' (docs/extending.md).

A factory receives the parameter groups (each with its own ``lr``: encoder, decoder, heads) and
the ``optim`` config, and returns a ``torch.optim.Optimizer``. The schedule (linear warm-up then
cosine) is applied on top by the module, whatever the optimiser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sap_lightning.backbones.checkpoints import unwrap
from sap_lightning.backbones.registry import BackboneSpec, resolve_spec
from sap_lightning.config.schema import OptimConfig
from sap_lightning.core.errors import ConfigError
from sap_lightning.core.registry import Registry

OptimizerFactory = Callable[[list[dict[str, Any]], OptimConfig], torch.optim.Optimizer]

OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer", "optim.optimizer")
register_optimizer = OPTIMIZERS.register
"""Decorator: ``@register_optimizer("name")`` on an :data:`OptimizerFactory`."""


def list_optimizers() -> list[str]:
    return OPTIMIZERS.names()


def create_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.optimizer)(groups, cfg)


@register_optimizer("adam")
def adam(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The paper's optimiser (L2 weight decay 1e-5)."""
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@register_optimizer("adamw")
def adamw(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam with decoupled weight decay."""
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@register_optimizer("sgd")
def sgd(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.99, nnU-Net's default for CNNs trained from scratch."""
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay
    )


def param_groups(
    model: nn.Module,
    spec: BackboneSpec | str,
    encoder_lr: float,
    decoder_lr: float,
    weight_decay: float = 1e-5,
) -> list[dict[str, Any]]:
    """Two optimiser parameter groups for the paper's differential learning rates.

    ``encoder`` holds the spec's encoder parameters; ``decoder`` everything else, the output
    layer included (SAP: encoder 2e-6 / decoder 1e-5; SSL: 5e-6 / 1e-5). Every parameter is in
    exactly one group, also when a module lists it under two names.
    """
    spec = resolve_spec(spec)
    names_by_param: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
        params[id(param)] = param
    encoder, decoder = [], []
    for key, names in names_by_param.items():
        is_encoder = any(spec.is_encoder_key(n) for n in names) and not any(
            spec.is_head_key(n) for n in names
        )
        (encoder if is_encoder else decoder).append(params[key])
    if not encoder:
        raise ConfigError(
            f"no model parameter matches the encoder prefixes {list(spec.encoder_prefixes)}; "
            "is the spec the model's backbone?"
        )
    return [
        {"name": "encoder", "params": encoder, "lr": encoder_lr, "weight_decay": weight_decay},
        {"name": "decoder", "params": decoder, "lr": decoder_lr, "weight_decay": weight_decay},
    ]

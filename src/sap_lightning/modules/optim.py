"""Optimisers by name (``optim.optimizer``): a registry like the backbones' (docs/extending.md).

A factory receives the parameter groups (each with its own ``lr``: encoder, decoder, heads) and
the ``optim`` config, and returns a ``torch.optim.Optimizer``. The schedule (linear warm-up then
cosine) is applied on top by the module, whatever the optimiser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sap_lightning.config.schema import OptimConfig
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

"""LightningModules of the training tasks, built on the backbone registry.

- :class:`SkeletonSegmentation`: stage 1 of SAP (background + 9 skeletal regions).
- :class:`LesionSegmentation`: stage 2 (binary lesions), initialised by the arm ``model.init``.
- :class:`ContrastivePretraining`: the SSL arm's pretraining (Tang et al., CVPR 2022).
- :class:`MaskedAutoencoderPretraining`: the MAE arm's pretraining (Wald et al., CVPR 2025).

A pretraining run trains the module its arm names (``core/arms.py``); modules are registered
by class name with :func:`register_module`, so a user's pretext plugs in the same way.
``build_module(cfg, data_info)`` picks the class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sap_lightning.config import ExperimentConfig, to_dict
from sap_lightning.core.arms import pretraining_arm
from sap_lightning.core.registry import Registry
from sap_lightning.modules.base import SapModule, data_info_from, warmup_cosine_factor
from sap_lightning.modules.lesion import LesionSegmentation
from sap_lightning.modules.mae import MaskedAutoencoderPretraining
from sap_lightning.modules.skeleton import SkeletonSegmentation
from sap_lightning.modules.ssl import ContrastivePretraining

MODULES: Registry[type[SapModule]] = Registry("LightningModule", "pretraining")
"""LightningModule classes by class name; an arm's ``Pretraining.module`` names one."""


def register_module(cls: type[SapModule]) -> type[SapModule]:
    """Class decorator: make a LightningModule available to arms by its class name."""
    return MODULES.register(cls.__name__)(cls)


for _cls in (
    SkeletonSegmentation,
    LesionSegmentation,
    ContrastivePretraining,
    MaskedAutoencoderPretraining,
):
    register_module(_cls)


def module_class(cfg: ExperimentConfig) -> type[SapModule]:
    """The class that trains ``cfg``: lesion segmentation for the lesion task, else the module
    of the arm whose pretraining the run is."""
    if cfg.task == "lesion":
        return LesionSegmentation
    arm = pretraining_arm(cfg.task, cfg.pretraining)
    assert arm.pretraining is not None
    cls = MODULES.get(arm.pretraining.module)
    if cls.task != cfg.task:
        raise TypeError(
            f"{cls.__name__} trains task {cls.task!r}, arm {arm.name!r} runs {cfg.task!r}"
        )
    return cls


def build_module(cfg: ExperimentConfig, data_info: Mapping[str, Any]) -> SapModule:
    """The module for ``cfg``, built from plain dicts (see :class:`SapModule`)."""
    return module_class(cfg)(to_dict(cfg), dict(data_info))


__all__ = [
    "MODULES",
    "ContrastivePretraining",
    "LesionSegmentation",
    "MaskedAutoencoderPretraining",
    "SapModule",
    "SkeletonSegmentation",
    "build_module",
    "data_info_from",
    "module_class",
    "register_module",
    "warmup_cosine_factor",
]

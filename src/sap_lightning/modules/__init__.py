"""LightningModules of the three training tasks, built on the backbone registry.

- :class:`SkeletonSegmentation`: stage 1 of SAP (background + 9 skeletal regions).
- :class:`LesionSegmentation`: stage 2 (binary lesions), ``model.init`` scratch | sap | ssl.
- :class:`ContrastivePretraining`: the SSL comparator (Tang et al., CVPR 2022).

``build_module(cfg, data_info)`` picks the class of ``cfg.task``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sap_lightning.config import ExperimentConfig, to_dict
from sap_lightning.core.tasks import TASKS
from sap_lightning.modules.base import SapModule, data_info_from, warmup_cosine_factor
from sap_lightning.modules.lesion import LesionSegmentation
from sap_lightning.modules.mae import MaskedAutoencoderPretraining
from sap_lightning.modules.skeleton import SkeletonSegmentation
from sap_lightning.modules.ssl import ContrastivePretraining

_CLASSES: dict[str, type[SapModule]] = {
    cls.__name__: cls for cls in (SkeletonSegmentation, LesionSegmentation, ContrastivePretraining)
}
MODULES: dict[str, type[SapModule]] = {name: _CLASSES[spec.module] for name, spec in TASKS.items()}
"""task -> LightningModule class, from the task table (``core/tasks.py``)."""


def build_module(cfg: ExperimentConfig, data_info: Mapping[str, Any]) -> SapModule:
    """The module for ``cfg.task``, built from plain dicts (see :class:`SapModule`); an SSL run
    with ``mae.enabled`` trains the masked autoencoder (``modules/mae.py``)."""
    if cfg.task == "ssl" and cfg.mae.enabled:
        return MaskedAutoencoderPretraining(to_dict(cfg), dict(data_info))
    return MODULES[cfg.task](to_dict(cfg), dict(data_info))


__all__ = [
    "MODULES",
    "ContrastivePretraining",
    "LesionSegmentation",
    "MaskedAutoencoderPretraining",
    "SapModule",
    "SkeletonSegmentation",
    "build_module",
    "data_info_from",
    "warmup_cosine_factor",
]

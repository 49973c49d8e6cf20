"""sap_lightning: Supervised Anatomical Pretraining for bone-metastasis segmentation on WB-MRI.

The top-level names below are the small public API (loaded on first use, so ``import
sap_lightning`` stays cheap); everything else lives in the stage folders (docs/data_flow.md).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

_API: dict[str, str] = {
    "make_phantom_cohort": "sap_lightning.synthetic.cohort",
    "check_dataset": "sap_lightning.dataset.validate",
    "load_dataset": "sap_lightning.dataset.info",
    "preprocess_dataset": "sap_lightning.cache.build",
    "open_cache": "sap_lightning.cache.reader",
    "split_dataset": "sap_lightning.cache.splits",
    "load_config": "sap_lightning.config.load",
    "create_backbone": "sap_lightning.backbones.registry",
    "list_backbones": "sap_lightning.backbones.registry",
    "register_backbone": "sap_lightning.backbones.registry",
    "transfer_weights": "sap_lightning.backbones.transfer",
    "lesion_detection": "sap_lightning.metrics.functional",
    "make_lesion_metrics": "sap_lightning.metrics.lesion",
    "run_training": "sap_lightning.pipeline.train",
    "run_study": "sap_lightning.pipeline.study",
    "Predictor": "sap_lightning.inference.predict",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sap_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

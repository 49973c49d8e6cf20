"""Experiment configuration: dataclass schemas and YAML/override loading."""

from sap_lightning.config.load import (
    from_dict,
    load_config,
    load_study_config,
    save_config,
    to_dict,
    to_yaml,
)
from sap_lightning.config.schema import ExperimentConfig, StudyConfig

__all__ = [
    "ExperimentConfig",
    "StudyConfig",
    "from_dict",
    "load_config",
    "load_study_config",
    "save_config",
    "to_dict",
    "to_yaml",
]

"""The task table: what each training task reads, samples, trains and exports.

One row per task replaces the task lists that configs, splits, DataModules and the training
pipeline would otherwise each keep. Which LightningModule trains a pretraining task is the
arm's to say (``core/arms.py``): ``ssl`` runs Tang et al.'s pretext or a masked autoencoder.
"""

from __future__ import annotations

from dataclasses import dataclass

from sap_lightning.core.errors import ConfigError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: str
    """Label set the task trains on: ``skeleton`` (10 classes), ``lesion`` (binary) or ``none``."""
    default_planner: str
    """Patch planner used when ``data.sampler`` is ``auto`` (``batches/planners.py``)."""
    exports_backbone: bool
    """Whether a finished run exports ``backbone.pt`` for a later stage to start from."""
    split: str
    """``holdout`` (train/validation by subject) or ``folds`` (cross-validation + tuning fold)."""


TASKS: dict[str, TaskSpec] = {
    "skeleton": TaskSpec("skeleton", "skeleton", "class_balanced", True, "holdout"),
    "lesion": TaskSpec("lesion", "lesion", "instance_balanced", False, "folds"),
    "ssl": TaskSpec("ssl", "none", "uniform", True, "holdout"),
}
"""Every task, by name."""

LABELLED_TASKS = tuple(name for name, spec in TASKS.items() if spec.labels != "none")
"""Tasks whose datasets carry labels (the kinds of dataset ``sap split`` and the cache know)."""


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"'task' is '{name}'; valid: {', '.join(TASKS)}") from None

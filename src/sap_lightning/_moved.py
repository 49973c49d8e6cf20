"""Import paths of release 0.1 keep working for one release, with a ``DeprecationWarning`` that
names the new module (the package was reorganised into one folder per stage; docs/data_flow.md).

A module that was split lists every module that took its names; the alias exposes them all.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED: dict[str, tuple[str, ...]] = {
    "sap_lightning.data": (),
    "sap_lightning.data.layout": ("sap_lightning.dataset.layout",),
    "sap_lightning.data.dataset": (
        "sap_lightning.dataset.validate",
        "sap_lightning.dataset.import_folder",
    ),
    "sap_lightning.data.phantom": ("sap_lightning.synthetic",),
    "sap_lightning.data.preprocess": ("sap_lightning.cache", "sap_lightning.core.lesions"),
    "sap_lightning.data.splits": ("sap_lightning.cache.splits",),
    "sap_lightning.data.samplers": ("sap_lightning.batches.planners",),
    "sap_lightning.data.subjects": ("sap_lightning.batches.patches", "sap_lightning.batches.store"),
    "sap_lightning.data.queue": ("sap_lightning.batches.queue",),
    "sap_lightning.data.augment": ("sap_lightning.batches.augment",),
    "sap_lightning.data.datamodule": ("sap_lightning.batches.datamodule",),
    "sap_lightning.errors": ("sap_lightning.core.errors",),
    "sap_lightning.io": ("sap_lightning.core.io",),
    "sap_lightning.run_layout": ("sap_lightning.core.run_layout",),
    "sap_lightning.transfer": ("sap_lightning.backbones.transfer",),
    "sap_lightning.train": ("sap_lightning.pipeline.train",),
    "sap_lightning.study": ("sap_lightning.pipeline.study",),
    "sap_lightning.inference.sliding_window": ("sap_lightning.core.windows",),
    "sap_lightning.evaluation.froc": ("sap_lightning.metrics.froc",),
}
REMOVED_IN = "0.3"


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the old names with a module that re-exports the new ones."""

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(
            fullname, self, is_package=fullname == "sap_lightning.data"
        )

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        targets = MOVED[module.__name__]
        if not targets:
            module.__path__ = []  # a package whose submodules this finder answers
            return
        warnings.warn(
            f"{module.__name__} moved to {' and '.join(targets)}; the old path will be removed "
            f"in sap_lightning {REMOVED_IN}",
            DeprecationWarning,
            stacklevel=2,
        )
        for target in targets:
            for name, value in vars(importlib.import_module(target)).items():
                if not name.startswith("__"):
                    setattr(module, name, value)


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())

"""Folds from nnU-Net: ``splits_final.json`` turned into this library's ``splits.json``.

nnU-Net v2 writes ``nnUNet_preprocessed/<Dataset>/splits_final.json`` as a list of folds, each
``{"train": [case, ...], "val": [case, ...]}``. Fold ``k``'s validation cases become fold ``k``
here, and one of them is named the threshold-tuning fold, so a study can reuse the exact folds
an nnU-Net baseline was cross-validated on. The val sets must partition the dataset's cases.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from sap_lightning.cache.splits import Splits, splits_from_dict, write_splits
from sap_lightning.core.errors import DatasetError
from sap_lightning.core.io import read_json
from sap_lightning.dataset import layout
from sap_lightning.dataset.info import DatasetInfo
from sap_lightning.dataset.validate import require_valid_dataset


def _shown(cases: list[str], limit: int = 5) -> str:
    return ", ".join(cases[:limit]) + (f", ... ({len(cases)} in all)" if len(cases) > limit else "")


def read_nnunet_splits(path: str | os.PathLike) -> list[dict[str, list[str]]]:
    """The folds of an nnU-Net ``splits_final.json``, checked for shape (not against data)."""
    path = Path(path)
    try:
        raw = read_json(path)
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: no such nnU-Net splits file") from err
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: unreadable nnU-Net splits file ({err})") from err
    if not isinstance(raw, list) or not raw:
        raise DatasetError(
            f"{path}: an nnU-Net splits file is a non-empty list of {{'train': [...], "
            f"'val': [...]}} folds, got {type(raw).__name__}"
        )
    folds = []
    for k, fold in enumerate(raw):
        parts = {key: fold.get(key) for key in ("train", "val")} if isinstance(fold, dict) else {}
        for key, cases in parts.items():
            if not isinstance(cases, list) or not all(isinstance(c, str) and c for c in cases):
                raise DatasetError(f"{path}: fold {k}: '{key}' must be a list of case ids")
        if not parts:
            raise DatasetError(f"{path}: fold {k} must be an object with 'train' and 'val'")
        folds.append(parts)
    return folds


def nnunet_folds_to_splits(
    folds: list[dict[str, list[str]]],
    case_ids: list[str],
    tuning_fold: int = 0,
    source: str = "splits_final.json",
) -> dict[str, Any]:
    """The ``splits.json`` mapping of nnU-Net folds: fold ``k`` = nnU-Net fold ``k``'s val set.

    Refuses, one problem per error: unknown case ids, a case in two val sets, a case in its own
    fold's train and val, dataset cases in no val set, empty val sets, a bad tuning fold.
    """
    known = set(case_ids)
    for k, fold in enumerate(folds):
        unknown = sorted({c for part in fold.values() for c in part} - known)
        if unknown:
            raise DatasetError(f"{source}: fold {k}: cases not in the dataset: {_shown(unknown)}")
    counts = Counter(c for fold in folds for c in set(fold["val"]))
    twice = sorted(c for c, n in counts.items() if n > 1)
    if twice:
        raise DatasetError(f"{source}: cases in the val sets of several folds: {_shown(twice)}")
    for k, fold in enumerate(folds):
        leak = sorted(set(fold["train"]) & set(fold["val"]))
        if leak:
            raise DatasetError(f"{source}: fold {k}: cases in both train and val: {_shown(leak)}")
        if not fold["val"]:
            raise DatasetError(f"{source}: fold {k}: empty val set")
    uncovered = sorted(known - set(counts))
    if uncovered:
        raise DatasetError(f"{source}: dataset cases in no val set: {_shown(uncovered)}")
    if len(folds) < 2:
        raise DatasetError(f"{source}: needs at least 2 folds (a tuning and a test fold)")
    if not 0 <= tuning_fold < len(folds):
        raise DatasetError(
            f"{source}: --tuning-fold {tuning_fold} is out of range 0..{len(folds) - 1}"
        )
    return {
        "task": "lesion",
        "n_folds": len(folds),
        "tuning_fold": tuning_fold,
        "seed": 0,
        "folds": [sorted(fold["val"]) for fold in folds],
        "nnunet_splits": str(source),
    }


def split_from_nnunet(
    root: str | os.PathLike,
    nnunet_splits: str | os.PathLike,
    tuning_fold: int = 0,
    out: str | os.PathLike | None = None,
    force: bool = False,
    info: DatasetInfo | None = None,
    task: str | None = None,
) -> tuple[Path, Splits, bool]:
    """Validate a lesion dataset, convert nnU-Net's folds and write them (like ``split_dataset``).

    Returns the path, the validated splits and whether the file was (re)written.
    """
    if info is None:
        info = require_valid_dataset(root, task=task)
    if info.task != "lesion":
        raise DatasetError(
            f"{info.root}: a {info.task} dataset; --from-nnunet makes lesion folds (a "
            "skeleton dataset takes a train/validation split: run sap split without it)"
        )
    folds = read_nnunet_splits(nnunet_splits)
    raw = nnunet_folds_to_splits(folds, list(info.case_ids), tuning_fold, str(nnunet_splits))
    path = Path(out) if out is not None else layout.default_splits_path(info.root)
    splits = splits_from_dict(raw, source=str(path), dataset=info)
    return path, splits, write_splits(path, raw, force=force)

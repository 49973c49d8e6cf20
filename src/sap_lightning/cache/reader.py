"""Reading the preprocessing cache (memory-mapped arrays, lesion table, class locations)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sap_lightning.core.errors import DatasetError
from sap_lightning.core.io import file_lock, read_json
from sap_lightning.core.lesions import LesionInfo

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
"""Bumped whenever the stored arrays or meta.json change meaning; older caches are refused.
2: arrays, affine and spacing in the canonical RAS+ frame, ``source_orientation`` in meta.json."""

IGNORE_VALUE = 255
"""What ``label.npy`` holds on the voxels of a dataset's ``ignore`` label, whatever the task: the
lesion task merges the foreground labels into class 1 and the skeleton task keeps its classes
0-9, so a fixed value above every class keeps the ignore voxels apart in both. A cache of a
dataset that declares the label says so in cache.json and meta.json (``ignore_value``); other
caches have no such key and no such voxel."""

CACHE_JSON = "cache.json"
CASES_DIR = "cases"
META_JSON = "meta.json"
IMAGE_FILE = "image.npy"
LABEL_FILE = "label.npy"
BODY_FILE = "body.npy"
LOCATIONS_FILE = "class_locations.npz"
LOCK_FILE = ".lock"
"""Held shared while a cache is opened and exclusively while ``preprocess_dataset`` changes it."""

# --------------------------------------------------------------------------- reading the cache


@dataclass
class CachedCase:
    """One preprocessed case; arrays are memory-mapped (read-only) unless loaded with mmap=False."""

    case_id: str
    subject_id: str
    image: np.ndarray
    label: np.ndarray | None
    body_mask: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    lesions: list[LesionInfo]
    """Lesions of a labelled lesion case (empty otherwise)."""
    meta: dict[str, Any]
    folder: Path

    @cached_property
    def class_locations(self) -> dict[int, np.ndarray]:
        """``{class value: (N, 3) int32 voxel indices}``, read on first use."""
        if not self.meta.get("has_label"):
            return {}
        path = self.folder / LOCATIONS_FILE
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {int(key): stored[key] for key in stored.files}
        except (OSError, ValueError, EOFError) as err:
            raise DatasetError(
                f"cache case {self.case_id}: {path}: unreadable ({err}); "
                "re-run sap preprocess --force"
            ) from err


@dataclass
class PreprocessedCache:
    """Read access to a cache built by ``preprocess_dataset``; open it with ``open_cache``."""

    root: Path
    description: dict[str, Any]
    metas: dict[str, dict[str, Any]]

    @property
    def task(self) -> str:
        return self.description["task"]

    @property
    def labels(self) -> dict[str, int]:
        return dict(self.description["labels"])

    @property
    def ignore_value(self) -> int | None:
        """The label value of ignored voxels (:data:`IGNORE_VALUE`), ``None`` when the dataset
        declares no ``ignore`` label."""
        return self.description.get("ignore_value")

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(self.description["channel_names"])

    @property
    def target_spacing(self) -> tuple[float, float, float] | None:
        spacing = self.description["target_spacing"]
        return None if spacing is None else tuple(spacing)

    @property
    def dataset(self) -> Path:
        return Path(self.description["dataset"])

    @property
    def case_ids(self) -> list[str]:
        return list(self.description["cases"])

    @property
    def subjects(self) -> dict[str, str]:
        return {case_id: meta["subject_id"] for case_id, meta in self.metas.items()}

    @property
    def labelled(self) -> bool:
        return bool(self.description["labelled"])

    def meta(self, case_id: str) -> dict[str, Any]:
        if case_id not in self.metas:
            raise DatasetError(f"cache {self.root}: no case {case_id!r}")
        return self.metas[case_id]

    def load(self, case_id: str, mmap: bool = True) -> CachedCase:
        """Open a case; with ``mmap`` the arrays are read lazily from disk (read-only)."""
        meta = self.meta(case_id)
        folder = self.root / CASES_DIR / case_id
        shape = tuple(meta["shape"])
        image = _load_array(folder / IMAGE_FILE, case_id, mmap, (len(self.channel_names), *shape))
        label = None
        if meta.get("has_label"):
            label = _load_array(folder / LABEL_FILE, case_id, mmap, shape)
        body = _load_array(folder / BODY_FILE, case_id, mmap, shape)
        lesions = [LesionInfo.from_dict(raw) for raw in meta.get("lesions") or []]
        return CachedCase(
            case_id=case_id,
            subject_id=meta["subject_id"],
            image=image,
            label=label,
            body_mask=body,
            spacing=tuple(meta["spacing"]),  # type: ignore[arg-type]
            affine=np.asarray(meta["affine"], dtype=np.float64),
            lesions=lesions,
            meta=meta,
            folder=folder,
        )


def _load_array(path: Path, case_id: str, mmap: bool, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError as err:
        raise DatasetError(
            f"cache case {case_id}: {path}: missing; re-run sap preprocess --force"
        ) from err
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(
            f"cache case {case_id}: {path}: corrupt ({err}); re-run sap preprocess --force"
        ) from err
    if array.shape != shape:
        raise DatasetError(
            f"cache case {case_id}: {path}: shape {array.shape}, meta.json says {shape}; "
            "re-run sap preprocess --force"
        )
    return array


def open_cache(cache_root: str | os.PathLike) -> PreprocessedCache:
    """Open a finished cache, checking its format version and every case's meta.json.

    Raises ``DatasetError`` naming the case and file when the cache is missing, unfinished, of
    another format version or has a case without a valid meta.json. Reads under the cache's
    shared lock: a concurrent ``sap preprocess`` is waited for, never seen half-done.
    """
    root = Path(cache_root)
    with file_lock(root / LOCK_FILE, shared=True):
        return _open_cache(root)


def _open_cache(root: Path) -> PreprocessedCache:
    path = root / CACHE_JSON
    if not path.is_file():
        state = "does not exist" if not root.exists() else f"has no {CACHE_JSON}"
        raise DatasetError(
            f"cache {root}: {state} (preprocessing never finished there); run sap preprocess"
        )
    try:
        description = read_json(path)
    except (OSError, ValueError) as err:
        raise DatasetError(f"cache {root}: {path}: unreadable ({err}); run sap preprocess") from err
    version = description.get("format_version") if isinstance(description, dict) else None
    if version != CACHE_FORMAT_VERSION:
        raise DatasetError(
            f"cache {root}: {path}: format version {version!r}, this library reads "
            f"{CACHE_FORMAT_VERSION}; rebuild it with sap preprocess --force"
        )
    metas: dict[str, dict[str, Any]] = {}
    problems = []
    for case_id in description["cases"]:
        case_dir = root / CASES_DIR / case_id
        meta = _read_meta(case_dir)
        if meta is None:
            problems.append(f"case {case_id}: {case_dir / META_JSON}: missing or invalid")
        else:
            metas[case_id] = meta
    if problems:
        raise DatasetError(
            f"cache {root}: {len(problems)} cases unusable (re-run sap preprocess):\n  "
            + "\n  ".join(problems)
        )
    return PreprocessedCache(root, description, metas)


def _read_meta(case_dir: Path) -> dict[str, Any] | None:
    """The case's meta.json when it is valid for this format version, else ``None``."""
    try:
        meta = read_json(case_dir / META_JSON)
    except (OSError, ValueError):
        return None
    required = {"format_version", "case_id", "shape", "spacing", "affine", "params", "sources"}
    if not isinstance(meta, dict) or not required <= set(meta):
        return None
    if meta["format_version"] != CACHE_FORMAT_VERSION or meta["case_id"] != case_dir.name:
        return None
    return meta

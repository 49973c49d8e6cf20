"""The preprocessing cache: normalised volumes stored uncompressed for memory-mapped patch reads.

Layout of a cache folder::

    CACHE/cache.json                  dataset, task, channels, labels, parameters, case list
    CACHE/cases/<case_id>/image.npy   float32 (C, X, Y, Z), each channel clipped to its
                                      whole-volume 1st-99th percentile and rescaled to [0, 1]
    CACHE/cases/<case_id>/label.npy   uint8 (X, Y, Z), when the dataset is labelled
    CACHE/cases/<case_id>/body.npy    uint8 (X, Y, Z) body mask (negative patches come from it)
    CACHE/cases/<case_id>/class_locations.npz   per class, up to N voxel indices (seeded)
    CACHE/cases/<case_id>/meta.json   spacing, affine, percentiles, body bbox, lesions, sources

Each case folder is written under a temporary name and renamed (``io.atomic_dir``), so a crash
never leaves a half case that reads as valid; ``cache.json`` is removed while a run changes the
cache and written last, so ``open_cache`` refuses a cache whose last run did not finish.
Re-running skips cases whose sources (size, mtime) and parameters are unchanged.

Inference on raw NIfTI must prepare images exactly as training saw them: it calls
``prepare_image``, the same function the cache uses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
from scipy import ndimage

from sap_lightning.data import layout
from sap_lightning.data.dataset import (
    CaseFiles,
    DatasetInfo,
    read_case_arrays,
    require_valid_dataset,
)
from sap_lightning.errors import ConfigError, DatasetError
from sap_lightning.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
"""Bumped whenever the stored arrays or meta.json change meaning; older caches are refused."""

CACHE_JSON = "cache.json"
CASES_DIR = "cases"
META_JSON = "meta.json"
IMAGE_FILE = "image.npy"
LABEL_FILE = "label.npy"
BODY_FILE = "body.npy"
LOCATIONS_FILE = "class_locations.npz"


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that changes the cached arrays; a case built with other values is rebuilt."""

    target_spacing: tuple[float, float, float] | None = None
    """Resample to this spacing (mm, array axis order); ``None`` keeps the native grid."""
    lower_percentile: float = 1.0
    upper_percentile: float = 99.0
    body_threshold: float = 0.1
    """Threshold on the mean normalised channel that separates body from air."""
    body_dilation: int = 2
    """Voxels added around the body so skin and thin structures stay inside the mask."""
    connectivity: int = 6
    """Lesion connectivity (method.md: the authors' code uses 6)."""
    max_locations_per_class: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target_spacing is not None:
            spacing = tuple(float(s) for s in self.target_spacing)
            if len(spacing) != 3 or not all(s > 0 and np.isfinite(s) for s in spacing):
                raise ConfigError(f"target spacing must be 3 positive numbers, got {spacing}")
            object.__setattr__(self, "target_spacing", spacing)
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ConfigError(
                "percentiles must satisfy 0 <= lower < upper <= 100, got "
                f"{self.lower_percentile}, {self.upper_percentile}"
            )
        if self.connectivity not in (6, 18, 26):
            raise ConfigError(f"connectivity must be 6, 18 or 26, got {self.connectivity}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, not tuples), comparable with what meta.json stores."""
        return json.loads(json.dumps(asdict(self)))


# --------------------------------------------------------------------------- array operations


def normalize_channels(
    image: np.ndarray, lower: float = 1.0, upper: float = 99.0
) -> tuple[np.ndarray, np.ndarray]:
    """Clip each channel to its ``lower``-``upper`` percentile and rescale it to [0, 1].

    Percentiles are taken over the whole volume given (method.md: never over a patch). A channel
    whose percentiles coincide (constant volume) carries no contrast and becomes all zeros.
    Returns the float32 image and the ``(C, 2)`` percentiles used.

    Written in numpy rather than with MONAI's ``ScaleIntensityRangePercentiles`` (which computes
    the same thing; the tests compare the two) so that preprocessing workers do not import torch
    and ``torch.quantile``'s input-size limit never applies to whole-body volumes.
    """
    image = np.asarray(image)
    if image.ndim < 2:
        raise ValueError(f"expected a (C, ...) image, got shape {image.shape}")
    normed = np.empty(image.shape, dtype=np.float32)
    percentiles = np.empty((image.shape[0], 2), dtype=np.float64)
    for index, channel in enumerate(image):
        # One float64 copy, partitioned in place (overwrite_input) instead of copied again.
        scratch = np.array(channel, dtype=np.float64)
        low, high = np.percentile(scratch, [lower, upper], overwrite_input=True)
        del scratch
        percentiles[index] = low, high
        if high > low:
            # In place on the float32 output: no full-size float64 temporaries.
            out = normed[index]
            np.clip(channel, low, high, out=out, casting="unsafe")
            out -= np.float32(low)
            out /= np.float32(high - low)
            np.clip(out, 0.0, 1.0, out=out)  # float32 rounding must not leave [0, 1]
        else:
            normed[index] = 0.0
    return normed, percentiles


def resampled_grid(
    shape: Sequence[int], affine: np.ndarray, target_spacing: Sequence[float]
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the grid covering the same extent at (about) ``target_spacing``.

    Voxels are treated as boxes (scipy's ``grid_mode=True``): the new grid spans exactly the old
    field of view, so the spacing actually reached is ``old_extent / new_shape`` per axis.
    """
    spacing = np.asarray(layout.spacing_of(affine))
    old_shape = np.asarray(shape, dtype=np.float64)
    new_shape = np.maximum(1, np.round(old_shape * spacing / np.asarray(target_spacing)))
    scale = old_shape / new_shape  # old voxels per new voxel
    # New voxel i has its centre at old continuous index (i + 0.5) * scale - 0.5.
    to_old = np.eye(4)
    to_old[:3, :3] = np.diag(scale)
    to_old[:3, 3] = 0.5 * scale - 0.5
    new_affine = np.asarray(affine, dtype=np.float64) @ to_old
    return (int(new_shape[0]), int(new_shape[1]), int(new_shape[2])), new_affine


def resample_volume(volume: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """Resample one 3D array to ``new_shape`` (order 1: linear for images, 0: nearest for labels).

    scipy.ndimage.zoom rather than MONAI ``Spacing`` or TorchIO ``Resample``: it works on the
    numpy arrays already in hand without torch or SimpleITK copies, ``grid_mode=True`` gives the
    exact box-to-box geometry that ``resampled_grid`` writes into the affine, and ``order=0``
    keeps label values intact.
    """
    zoom = np.asarray(new_shape, dtype=np.float64) / np.asarray(volume.shape, dtype=np.float64)
    out = ndimage.zoom(volume, zoom, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(new_shape):  # rounding inside zoom; never expected
        raise RuntimeError(f"resampling produced shape {out.shape}, expected {tuple(new_shape)}")
    return out


def prepare_image(
    image: np.ndarray,
    affine: np.ndarray,
    target_spacing: Sequence[float] | None = None,
    lower: float = 1.0,
    upper: float = 99.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample (optional, linear) then normalise a ``(C, X, Y, Z)`` image.

    The one function that turns raw intensities into network input, shared by the cache and by
    inference. Normalising after resampling makes the percentiles those of the grid the network
    sees. Returns ``(normed float32, affine, percentiles (C, 2))``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if target_spacing is not None and not _same_spacing(affine, target_spacing):
        new_shape, affine = resampled_grid(image.shape[1:], affine, target_spacing)
        image = np.stack([resample_volume(channel, new_shape, order=1) for channel in image])
    normed, percentiles = normalize_channels(image, lower, upper)
    return normed, affine, percentiles


def _same_spacing(affine: np.ndarray, target_spacing: Sequence[float]) -> bool:
    return bool(np.allclose(layout.spacing_of(affine), target_spacing, rtol=1e-6, atol=0))


def compute_body_mask(
    normed: np.ndarray, affine: np.ndarray, threshold: float = 0.1, dilation: int = 2
) -> np.ndarray:
    """A boolean body mask from a normalised ``(C, X, Y, Z)`` image (real data has none).

    Threshold the mean channel, fill holes slice by slice in the axial plane (the body is cut open
    at the ends of the field of view, so 3D filling would miss them), keep the largest
    6-connected component (drops noise and table), then dilate a little. An image with nothing
    above the threshold gives the whole volume, so negative sampling still has somewhere to go.
    """
    foreground = normed.mean(axis=0) > threshold
    if not foreground.any():
        log.warning("no voxel above the body threshold %s: using the whole volume", threshold)
        return np.ones(foreground.shape, dtype=bool)
    # The array axis that points most along the world z (head-feet) axis is the slice axis.
    axial = int(np.argmax(np.abs(np.asarray(affine)[2, :3])))
    planar = np.expand_dims(ndimage.generate_binary_structure(2, 1), axis=axial)
    filled = ndimage.binary_fill_holes(foreground, structure=planar)
    largest = cc3d.largest_k(filled, k=1, connectivity=6) > 0
    if dilation > 0:
        cross = ndimage.generate_binary_structure(3, 1)
        largest = ndimage.binary_dilation(largest, structure=cross, iterations=dilation)
    return largest


def bounding_box(mask: np.ndarray) -> tuple[int, ...]:
    """``(x0, y0, z0, x1, y1, z1)``, half-open, of the non-zero voxels (all zeros if none)."""
    if not mask.any():
        return (0,) * (2 * mask.ndim)
    starts, stops = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        starts.append(int(present[0]))
        stops.append(int(present[-1]) + 1)
    return (*starts, *stops)


@dataclass(frozen=True)
class LesionInfo:
    """One lesion: a connected component of the lesion label."""

    component_id: int
    voxels: int
    volume_ml: float
    bbox: tuple[int, int, int, int, int, int]
    """``(x0, y0, z0, x1, y1, z1)``: start inclusive, stop exclusive, in voxels."""

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        x0, y0, z0, x1, y1, z1 = self.bbox
        return slice(x0, x1), slice(y0, y1), slice(z0, z1)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LesionInfo:
        return cls(
            int(raw["component_id"]),
            int(raw["voxels"]),
            float(raw["volume_ml"]),
            tuple(int(v) for v in raw["bbox"]),  # type: ignore[arg-type]
        )


def lesion_components(
    label: np.ndarray, spacing: Sequence[float], connectivity: int = 6
) -> list[LesionInfo]:
    """Connected components of ``label > 0`` (cc3d) with voxel count, volume (mL) and bbox."""
    components, count = cc3d.connected_components(
        label > 0, connectivity=connectivity, return_N=True
    )
    if count == 0:
        return []
    stats = cc3d.statistics(components)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesions = []
    for component_id in range(1, count + 1):
        voxels = int(stats["voxel_counts"][component_id])
        box = stats["bounding_boxes"][component_id]
        bbox = (*(int(s.start) for s in box), *(int(s.stop) for s in box))
        lesions.append(LesionInfo(component_id, voxels, voxels * voxel_ml, bbox))  # type: ignore[arg-type]
    return lesions


def sample_class_locations(
    label: np.ndarray, classes: Sequence[int], max_per_class: int, seed: Sequence[int] | int
) -> dict[int, np.ndarray]:
    """Per class, up to ``max_per_class`` voxel indices ``(N, 3)`` drawn without replacement.

    Precomputed (as nnU-Net does) so class-balanced samplers need not scan whole volumes.
    """
    rng = np.random.default_rng(seed)
    flat_label = label.ravel()
    foreground = np.flatnonzero(flat_label)
    values = flat_label[foreground]
    locations = {}
    for value in classes:
        indices = foreground[values == value]
        if indices.size > max_per_class:
            indices = np.sort(rng.choice(indices, size=max_per_class, replace=False))
        locations[int(value)] = np.stack(np.unravel_index(indices, label.shape), axis=1).astype(
            np.int32
        )
    return locations


# --------------------------------------------------------------------------- building the cache


@dataclass
class PreprocessReport:
    """What a ``preprocess_dataset`` run did, by case id."""

    cache_root: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _save_array(path: Path, array: np.ndarray) -> None:
    """Save one uncompressed array (memory-mappable by ``np.load(mmap_mode='r')``)."""
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)


def source_signatures(case: CaseFiles) -> list[dict[str, Any]]:
    """Path, size and mtime of every source file: a changed file makes the case stale."""
    paths = [*case.images, *([case.label] if case.label is not None else [])]
    signatures = []
    for path in paths:
        stat = os.stat(path)
        signatures.append(
            {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        )
    return signatures


def _case_seed(seed: int, case_id: str) -> list[int]:
    """A per-case seed independent of worker scheduling and of Python's hash randomisation."""
    return [seed, zlib.crc32(case_id.encode())]


def build_case(
    case: CaseFiles,
    case_dir: Path,
    task: str,
    labels: dict[str, int],
    params: PreprocessParams,
    signatures: list[dict[str, Any]],
) -> str:
    """Preprocess one case into ``case_dir`` atomically; returns the case id."""
    image, label, affine = read_case_arrays(case)
    original_shape = image.shape[1:]
    original_spacing = layout.spacing_of(affine)
    normed, new_affine, percentiles = prepare_image(
        image, affine, params.target_spacing, params.lower_percentile, params.upper_percentile
    )
    del image
    if label is not None and normed.shape[1:] != label.shape:
        label = resample_volume(label, normed.shape[1:], order=0)
    spacing = layout.spacing_of(new_affine)
    body = compute_body_mask(normed, new_affine, params.body_threshold, params.body_dilation)
    lesions = None
    locations = None
    if label is not None:
        if task == "lesion":
            lesions = lesion_components(label, spacing, params.connectivity)
        classes = sorted(v for v in labels.values() if v != 0)
        locations = sample_class_locations(
            label, classes, params.max_locations_per_class, _case_seed(params.seed, case.case_id)
        )
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "case_id": case.case_id,
        "subject_id": case.subject_id,
        "shape": list(normed.shape[1:]),
        "spacing": list(spacing),
        "affine": new_affine.tolist(),
        "original_shape": list(original_shape),
        "original_spacing": list(original_spacing),
        "percentiles": percentiles.tolist(),
        "body_bbox": list(bounding_box(body)),
        "has_label": label is not None,
        "lesions": None if lesions is None else [asdict(lesion) for lesion in lesions],
        "labels": labels,
        "params": params.to_dict(),
        "sources": signatures,
    }
    with atomic_dir(case_dir) as tmp:
        _save_array(tmp / IMAGE_FILE, normed)
        if label is not None:
            _save_array(tmp / LABEL_FILE, label.astype(np.uint8))
        _save_array(tmp / BODY_FILE, body.astype(np.uint8))
        if locations is not None:
            np.savez(tmp / LOCATIONS_FILE, **{str(k): v for k, v in locations.items()})
        write_json(tmp / META_JSON, meta)  # last: a folder with a meta.json is complete
    return case.case_id


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


def _expected_files(meta: dict[str, Any]) -> list[str]:
    files = [IMAGE_FILE, BODY_FILE, META_JSON]
    if meta.get("has_label"):
        files += [LABEL_FILE, LOCATIONS_FILE]
    return files


def _is_current(
    case_dir: Path,
    case: CaseFiles,
    labels: dict[str, int],
    params: PreprocessParams,
    signatures: list[dict[str, Any]],
) -> bool:
    meta = _read_meta(case_dir)
    return (
        meta is not None
        and meta.get("params") == params.to_dict()
        and meta.get("sources") == signatures
        and meta.get("labels") == labels
        and meta.get("subject_id") == case.subject_id
        and all((case_dir / name).is_file() for name in _expected_files(meta))
    )


def _cache_description(info: DatasetInfo, params: PreprocessParams) -> dict[str, Any]:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "dataset": str(info.root.resolve()),
        "name": info.name,
        "task": info.task,
        "channel_names": list(info.channel_names),
        "labels": info.labels,
        "target_spacing": None if params.target_spacing is None else list(params.target_spacing),
        "params": params.to_dict(),
        "labelled": all(case.label is not None for case in info.cases),
        "cases": info.case_ids,
        "subjects": info.subjects,
    }


def _check_cache_target(cache_root: Path, info: DatasetInfo, force: bool) -> None:
    """Refuse to write into a folder that is not this dataset's cache (unless ``force``)."""
    if not cache_root.exists():
        return
    if not cache_root.is_dir():
        raise DatasetError(f"cache {cache_root}: exists and is not a folder")
    description = cache_root / CACHE_JSON
    if description.exists():
        try:
            previous = read_json(description)
            other = Path(previous["dataset"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            if force:
                return
            raise DatasetError(
                f"cache {cache_root}: {CACHE_JSON} is unreadable ({err}); pass --force to rebuild"
            ) from err
        if other != info.root.resolve() and not force:
            raise DatasetError(
                f"cache {cache_root}: {CACHE_JSON} belongs to dataset {other}, not "
                f"{info.root.resolve()}; choose another --out or pass --force to replace it"
            )
    elif any(cache_root.iterdir()) and not (cache_root / CASES_DIR).is_dir():
        raise DatasetError(
            f"cache {cache_root}: folder is not empty and is not a preprocessing cache; "
            "choose another --out"
        )


def _remove_leftovers(cases_dir: Path) -> None:
    """Delete temporary folders that a killed run left behind (hidden ``.name.tmp-*``)."""
    if not cases_dir.is_dir():
        return
    for entry in cases_dir.iterdir():
        if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
            shutil.rmtree(entry, ignore_errors=True)


def preprocess_dataset(
    dataset_root: str | os.PathLike,
    cache_root: str | os.PathLike,
    params: PreprocessParams | None = None,
    workers: int = 1,
    force: bool = False,
) -> PreprocessReport:
    """Build or update the cache of a dataset; up-to-date cases are skipped unless ``force``.

    The dataset is validated first (``require_valid_dataset``) and nothing is written when it has
    problems. A dataset with a ``labelsTr`` folder must label every case; one without it is
    cached unlabelled (for inference).
    """
    params = params or PreprocessParams()
    dataset_root = Path(dataset_root)
    require_labels = (dataset_root / layout.LABELS_DIR).is_dir()
    info = require_valid_dataset(dataset_root, require_labels=require_labels, workers=workers)
    cache_root = Path(cache_root)
    _check_cache_target(cache_root, info, force)
    cases_dir = cache_root / CASES_DIR
    _remove_leftovers(cases_dir)

    report = PreprocessReport(cache_root)
    todo: list[tuple[CaseFiles, list[dict[str, Any]]]] = []
    for case in info.cases:
        signatures = source_signatures(case)
        case_dir = cases_dir / case.case_id
        if not force and _is_current(case_dir, case, info.labels, params, signatures):
            report.skipped.append(case.case_id)
        else:
            todo.append((case, signatures))
    stale = _stale_case_folders(cases_dir, set(info.case_ids))
    description = _cache_description(info, params)
    description_path = cache_root / CACHE_JSON
    if not todo and not stale and _read_description(description_path) == description:
        return report

    # While the cache changes it has no cache.json, so it cannot be opened half-updated.
    description_path.unlink(missing_ok=True)
    cases_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (case, cases_dir / case.case_id, info.task, info.labels, params, signatures)
        for case, signatures in todo
    ]
    if workers <= 1 or len(jobs) <= 1:
        for number, job in enumerate(jobs, start=1):
            report.written.append(build_case(*job))
            log.info("preprocessed %s (%d/%d)", job[0].case_id, number, len(jobs))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for case_id in pool.map(build_case, *zip(*jobs)):
                report.written.append(case_id)
                log.info("preprocessed %s (%d/%d)", case_id, len(report.written), len(jobs))
    for folder in stale:
        shutil.rmtree(folder)
        report.removed.append(folder.name)
    write_json(description_path, description)
    return report


def _stale_case_folders(cases_dir: Path, case_ids: set[str]) -> list[Path]:
    """Case folders of cases the dataset no longer has."""
    if not cases_dir.is_dir():
        return []
    return sorted(
        p
        for p in cases_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in case_ids
    )


def _read_description(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


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
    another format version or has a case without a valid meta.json.
    """
    root = Path(cache_root)
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

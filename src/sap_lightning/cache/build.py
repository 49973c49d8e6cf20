"""Building the preprocessing cache from a raw dataset."""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from sap_lightning.cache.normalize import compute_body_mask, prepare_image, resample_volume
from sap_lightning.cache.reader import (
    BODY_FILE,
    CACHE_FORMAT_VERSION,
    CACHE_JSON,
    CASES_DIR,
    IGNORE_VALUE,
    IMAGE_FILE,
    LABEL_FILE,
    LOCATIONS_FILE,
    LOCK_FILE,
    META_JSON,
    _read_meta,
)
from sap_lightning.core.errors import ConfigError, DatasetError
from sap_lightning.core.io import atomic_dir, file_lock, read_json, write_json, writer_pid
from sap_lightning.core.lesions import bounding_box, check_connectivity, lesion_components
from sap_lightning.core.protocol import DEFAULT_CONNECTIVITY
from sap_lightning.core.threads import single_threaded_children, worker_processes
from sap_lightning.dataset import layout
from sap_lightning.dataset.info import CaseFiles, DatasetInfo, read_case
from sap_lightning.dataset.validate import require_valid_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that changes the cached arrays; a case built with other values is rebuilt."""

    target_spacing: tuple[float, float, float] | None = None
    """Resample to this spacing (mm, array axis order); ``None`` keeps the native grid."""
    lower_percentile: float = 1.0
    upper_percentile: float = 99.0
    body_threshold: float | None = None
    """Threshold on the smoothed mean normalised channel that separates body from air; ``None``:
    Otsu's threshold of each image (``compute_body_mask``)."""
    body_dilation: int = 2
    """Voxels added around the body so skin and thin structures stay inside the mask."""
    connectivity: int = DEFAULT_CONNECTIVITY
    """Lesion connectivity (docs/method.md: the authors' code uses 6)."""
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
        try:
            check_connectivity(self.connectivity)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, not tuples), comparable with what meta.json stores."""
        return json.loads(json.dumps(asdict(self)))


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
    ignore_value: int | None = None,
) -> str:
    """Preprocess one case into ``case_dir`` atomically; returns the case id.

    ``ignore_value`` is the dataset's ``ignore`` label value: those voxels are cached as
    :data:`IGNORE_VALUE`, outside every lesion and class location."""
    arrays = read_case(case)  # canonical RAS+ voxel order (dataset/images.py)
    image, label, affine = arrays.image, arrays.label, arrays.affine
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
    ignored = None
    if label is not None:
        if ignore_value is not None:
            ignored = label == ignore_value
            label = np.where(ignored, 0, label)
        if task == "lesion":
            label = (label > 0).astype(np.uint8)  # several foreground labels: one lesion class
            lesions = lesion_components(label, spacing, params.connectivity)
        classes = sorted(v for v in labels.values() if v != 0)
        locations = sample_class_locations(
            label, classes, params.max_locations_per_class, _case_seed(params.seed, case.case_id)
        )
        if ignored is not None:
            label = np.where(ignored, IGNORE_VALUE, label)
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "case_id": case.case_id,
        "subject_id": case.subject_id,
        "shape": list(normed.shape[1:]),
        "spacing": list(spacing),
        "affine": new_affine.tolist(),
        "original_shape": list(original_shape),
        "original_spacing": list(original_spacing),
        "source_orientation": arrays.source.orientation,
        "percentiles": percentiles.tolist(),
        "body_bbox": list(bounding_box(body)),
        "has_label": label is not None,
        "lesions": None if lesions is None else [asdict(lesion) for lesion in lesions],
        "labels": labels,
        "params": params.to_dict(),
        "sources": signatures,
        **_ignore_entry(ignore_value),
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


def _ignore_entry(ignore_value: int | None) -> dict[str, int]:
    """``{"ignore_value": IGNORE_VALUE}`` for a dataset with an ``ignore`` label, else nothing:
    the caches of every other dataset stay as they were."""
    return {} if ignore_value is None else {"ignore_value": IGNORE_VALUE}


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
    ignore_value: int | None,
) -> bool:
    meta = _read_meta(case_dir)
    return (
        meta is not None
        and meta.get("params") == params.to_dict()
        and meta.get("sources") == signatures
        and meta.get("labels") == labels
        and meta.get("ignore_value") == _ignore_entry(ignore_value).get("ignore_value")
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
        "labels": info.task_labels,
        "target_spacing": None if params.target_spacing is None else list(params.target_spacing),
        "params": params.to_dict(),
        "labelled": all(case.label is not None for case in info.cases),
        "cases": info.case_ids,
        "subjects": info.subjects,
        **_ignore_entry(info.ignore_value),
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
    elif (
        any(p.name != LOCK_FILE for p in cache_root.iterdir())
        and not (cache_root / CASES_DIR).is_dir()
    ):
        raise DatasetError(
            f"cache {cache_root}: folder is not empty and is not a preprocessing cache; "
            "choose another --out"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(cases_dir: Path) -> None:
    """Delete temporary folders that a killed run left behind (hidden ``.name.tmp-<pid>-*``).

    Called with the cache lock held, so no other writer is at work; a folder whose writer is
    still alive on this host is kept all the same.
    """
    if not cases_dir.is_dir():
        return
    for entry in cases_dir.iterdir():
        if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
            pid = writer_pid(entry.name)
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                continue
            shutil.rmtree(entry, ignore_errors=True)


def preprocess_dataset(
    dataset_root: str | os.PathLike,
    cache_root: str | os.PathLike,
    params: PreprocessParams | None = None,
    workers: int = 1,
    force: bool = False,
    info: DatasetInfo | None = None,
    task: str | None = None,
) -> PreprocessReport:
    """Build or update the cache of a dataset; up-to-date cases are skipped unless ``force``.

    The dataset is validated first (``require_valid_dataset``) and nothing is written when it has
    problems; a caller that has just validated it passes the result as ``info``. A dataset with
    a ``labelsTr`` folder must label every case; one without it is cached unlabelled. ``task``
    names the task when the label set does not say (``--task``); a lesion cache holds one
    lesion class (label > 0).
    """
    params = params or PreprocessParams()
    dataset_root = Path(dataset_root)
    require_labels = (dataset_root / layout.LABELS_DIR).is_dir()
    if info is None:
        info = require_valid_dataset(
            dataset_root, require_labels=require_labels, workers=workers, task=task
        )
    cache_root = Path(cache_root)
    _check_cache_target(cache_root, info, force)  # before the lock file is created there
    # One writer at a time (``fcntl.flock`` on <cache>/.lock; ``open_cache`` holds it shared):
    # concurrent runs and fold jobs wait, then find the cases current and skip them.
    with file_lock(cache_root / LOCK_FILE):
        return _update_cache(cache_root, info, params, workers, force)


def _update_cache(
    cache_root: Path, info: DatasetInfo, params: PreprocessParams, workers: int, force: bool
) -> PreprocessReport:
    """The locked part of :func:`preprocess_dataset`: check, build, remove stale, describe."""
    _check_cache_target(cache_root, info, force)  # again: another writer may have changed it
    cases_dir = cache_root / CASES_DIR
    _remove_leftovers(cases_dir)

    report = PreprocessReport(cache_root)
    todo: list[tuple[CaseFiles, list[dict[str, Any]]]] = []
    for case in info.cases:
        signatures = source_signatures(case)
        case_dir = cases_dir / case.case_id
        if not force and _is_current(
            case_dir, case, info.task_labels, params, signatures, info.ignore_value
        ):
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
        (
            case,
            cases_dir / case.case_id,
            info.task,
            info.task_labels,
            params,
            signatures,
            info.ignore_value,
        )
        for case, signatures in todo
    ]
    if workers <= 1 or len(jobs) <= 1:
        for number, job in enumerate(jobs, start=1):
            report.written.append(build_case(*job))
            log.info("preprocessed %s (%d/%d)", job[0].case_id, number, len(jobs))
    else:
        # One single-threaded process per usable CPU: more would only oversubscribe them.
        processes = worker_processes(min(workers, len(jobs)))
        with (
            single_threaded_children(),
            ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn")) as pool,
        ):
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

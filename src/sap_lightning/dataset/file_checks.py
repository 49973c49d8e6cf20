"""File-level checks: what reading one image or label file finds, and how a case's files agree.

Every voxel of a file is read once (slab by slab, so a whole-body volume needs no full-size
copy): readability, dimensionality, NaN/Inf voxels, a constant image, non-integer label values
and the label values present. A clean result is remembered with the file's fingerprint
(``check_cache``), so an unchanged file is not read again. ``cross_check`` turns the per-file
results of a case into problems, adding shape and affine disagreements between its files.
``validate.py`` decides which files a dataset or a case must have and calls these.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Collection, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from sap_lightning.dataset import layout
from sap_lightning.dataset.check_cache import CheckCache, decode, encode
from sap_lightning.dataset.images import (
    NIFTI_ENDINGS,
    canonical_affine,
    canonical_shape,
    image_file_ending,
    read_image,
)
from sap_lightning.dataset.spec import Problem

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference (mm) allowed between affine entries of files of one case: far below any
voxel size, well above the rounding of header fields stored as float32."""

_CHUNK_VOXELS = 1 << 24
"""Voxel statistics are computed slab by slab so a whole-body volume needs no full-size copy."""


@dataclass
class _FileReport:
    """What reading one NIfTI file found; ``shape``/``affine`` are ``None`` when unusable."""

    shape: tuple[int, ...] | None = None
    affine: np.ndarray | None = None
    values: set[int] | None = None
    problems: list[str] = field(default_factory=list)


def _slabs(array: np.ndarray) -> Iterator[np.ndarray]:
    """Views of about ``_CHUNK_VOXELS`` voxels along the slowest-varying axis."""
    axis = array.ndim - 1 if array.flags.f_contiguous and not array.flags.c_contiguous else 0
    per_slice = max(1, array.size // max(1, array.shape[axis]))
    step = max(1, _CHUNK_VOXELS // per_slice)
    for start in range(0, array.shape[axis], step):
        index = [slice(None)] * array.ndim
        index[axis] = slice(start, start + step)
        yield array[tuple(index)]


def _integer_values(chunk: np.ndarray) -> set[int]:
    low, high = int(chunk.min()), int(chunk.max())
    if high - low < 1 << 16:  # a histogram is much faster than sorting for label ranges
        counts = np.bincount((chunk.astype(np.int64) - low).ravel(), minlength=high - low + 1)
        return {int(v) + low for v in np.flatnonzero(counts)}
    return {int(v) for v in np.unique(chunk)}


def _inspect_file(path: Path, kind: str) -> _FileReport:
    """Read one file once: readability, dimensionality, non-finite voxels, label values, and
    (images) a constant volume, which intensity normalisation cannot rescale.

    ``kind`` is ``"image"`` (intensities) or ``"label"`` (integer class map). ``shape`` and
    ``affine`` are those of the canonical RAS+ grid (``images.to_canonical``), so files of a case
    stored in different voxel orders agree when they cover the same world grid.
    """
    report = _FileReport()
    try:
        image = read_image(path)
        data = image.data
        affine = image.affine
    except Exception as err:  # nibabel, SimpleITK, gzip and zlib raise many types
        what = "NIfTI" if image_file_ending(path) in NIFTI_ENDINGS else "image file"
        report.problems.append(f"unreadable or corrupt {what} ({type(err).__name__}: {err})")
        return report
    if data.ndim != 3:
        report.problems.append(f"not a 3D volume: shape {tuple(data.shape)}")
        return report
    if data.size == 0:
        report.problems.append(f"empty volume: shape {tuple(data.shape)}")
        return report
    if not np.all(np.isfinite(affine)):
        report.problems.append("affine holds NaN/Inf")
        report.shape = tuple(int(s) for s in data.shape)
    else:
        report.affine = canonical_affine(affine, data.shape)
        report.shape = canonical_shape(affine, data.shape)
    is_float = data.dtype.kind in "fc"
    non_finite = non_integer = 0
    values: set[int] = set()
    low, high = np.inf, -np.inf
    for chunk in _slabs(data):
        if is_float:
            finite = np.isfinite(chunk)
            non_finite += int(chunk.size - np.count_nonzero(finite))
            if kind == "label" or non_finite:
                chunk = chunk[finite]
            if kind == "label":
                whole = chunk == np.round(chunk)
                non_integer += int(chunk.size - np.count_nonzero(whole))
                chunk = chunk[whole]
        if kind == "label" and chunk.size:
            values |= _integer_values(chunk)
        elif kind == "image" and chunk.size:
            low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    if non_finite:
        report.problems.append(f"{non_finite} NaN/Inf voxels")
    elif kind == "image" and low == high:
        report.problems.append(
            f"constant image (every voxel is {low:g}): no contrast, and intensity "
            "normalisation would divide by zero"
        )
    if non_integer:
        report.problems.append(f"{non_integer} non-integer label values")
    if kind == "label":
        report.values = values
    return report


def inspect_files(tasks: list[tuple[Path, str]], workers: int) -> list[_FileReport]:
    """``_inspect_file`` of every ``(path, kind)``, in order; ``workers`` processes for several."""
    if workers <= 1 or len(tasks) <= 1:
        return [_inspect_file(path, kind) for path, kind in tasks]
    # spawn, not fork: callers may already run threads (torch, data loaders).
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_inspect_file, *zip(*tasks), chunksize=1))


def _describe_affine_difference(affine: np.ndarray, reference: np.ndarray) -> str | None:
    difference = float(np.max(np.abs(affine - reference)))
    if difference <= AFFINE_TOLERANCE_MM:
        return None
    return f"by up to {difference:.4g} mm (tolerance {AFFINE_TOLERANCE_MM} mm)"


def _checks_version() -> str:
    """What produced cached check results: the per-file check's code and the readers' versions
    (results of another version are not trusted)."""
    import nibabel

    try:
        source = inspect.getsource(_inspect_file) + inspect.getsource(_FileReport)
    except (OSError, TypeError):  # no source (frozen install): the module's own file instead
        source = str(Path(__file__).stat().st_mtime_ns)
    digest = hashlib.sha1(source.encode()).hexdigest()[:16]
    return f"{digest}:nibabel-{nibabel.__version__}"


def inspect_cached(
    root: Path, tasks: list[tuple[Path, str]], workers: int, use_cache: bool
) -> list[_FileReport]:
    """``inspect_files`` that reads only files whose clean result is not remembered."""
    if not use_cache:
        return inspect_files(tasks, workers)
    cache = CheckCache(root, _checks_version())
    looked_up = [cache.lookup(path, kind) for path, kind in tasks]
    reports: list[_FileReport | None] = []
    for stored, _print in looked_up:
        try:
            reports.append(decode(_FileReport, stored) if stored is not None else None)
        except (TypeError, ValueError, KeyError):  # a hand-edited or foreign entry: read again
            reports.append(None)
    todo = [index for index, report in enumerate(reports) if report is None]
    for index, report in zip(todo, inspect_files([tasks[i] for i in todo], workers)):
        reports[index] = report
        if not report.problems:
            cache.store(*tasks[index], looked_up[index][1], encode(report))
    cache.save()
    return reports  # type: ignore[return-value]  (every None was replaced)


def cross_check(
    owners: list[tuple[str, str, str]],
    reports: list[_FileReport],
    label_values: Collection[int] | None,
) -> list[Problem]:
    """Per-file problems, then shape/affine agreement with the case's first readable image.

    ``label_values``: the values a label file may hold (its classes and, when dataset.json
    declares one, the ``ignore`` value); ``None`` checks none."""
    problems: list[Problem] = []
    reference: dict[str, tuple[str, _FileReport]] = {}
    allowed = {
        "label": set(label_values) if label_values else None,
        "skeleton": set(layout.SKELETON_LABELS.values()),
    }
    for (case_id, role, rel), report in zip(owners, reports):
        problems += [Problem(case_id, rel, message) for message in report.problems]
        if report.values is not None and allowed.get(role) is not None:
            undeclared = sorted(report.values - allowed[role])
            if undeclared:
                where = "dataset.json labels" if role == "label" else "the skeleton label set"
                problems.append(
                    Problem(case_id, rel, f"label values {undeclared} not declared in {where}")
                )
        if report.shape is None:
            continue
        if case_id not in reference:
            if role == "image":
                reference[case_id] = (rel, report)
            continue
        ref_rel, ref = reference[case_id]
        if report.shape != ref.shape:
            problems.append(
                Problem(case_id, rel, f"shape {report.shape} differs from {ref_rel} {ref.shape}")
            )
        elif report.affine is not None and ref.affine is not None:
            difference = _describe_affine_difference(report.affine, ref.affine)
            if difference:
                problems.append(
                    Problem(case_id, rel, f"affine differs from {ref_rel} {difference}")
                )
    return problems

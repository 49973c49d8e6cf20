"""Reading and validating datasets in the nnU-Net v2 raw layout (see ``layout.py``).

Three levels of cost:

- ``load_dataset`` reads ``dataset.json`` and lists files: cheap, structure only.
- ``check_dataset`` reads every voxel of every file once and reports *every* problem it finds,
  each naming the case and the file, so a user fixes a broken dataset in one pass.
- ``require_valid_dataset`` runs the check and raises ``DatasetError`` listing all problems; every
  training, preprocessing and evaluation command calls it first, so nothing starts on a broken
  dataset.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from sap_lightning.core.errors import DatasetError
from sap_lightning.dataset import layout

SUPPORTED_FILE_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii")

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference (mm) allowed between affine entries of files of one case: far below any
voxel size, well above the rounding of header fields stored as float32."""

_CHUNK_VOXELS = 1 << 24
"""Voxel statistics are computed slab by slab so a whole-body volume needs no full-size copy."""


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: one image per channel (in channel order) and an optional label."""

    case_id: str
    subject_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass
class DatasetInfo:
    """The structure of a dataset folder (no voxel was read to build it)."""

    root: Path
    name: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    cases: list[CaseFiles]
    file_ending: str = layout.FILE_ENDING

    @property
    def task(self) -> str:
        """``"lesion"`` or ``"skeleton"``, from the label set."""
        return layout.task_of_labels(self.labels)

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]

    @property
    def subjects(self) -> dict[str, str]:
        """``{case_id: subject_id}`` for every case."""
        return {case.case_id: case.subject_id for case in self.cases}

    def case(self, case_id: str) -> CaseFiles:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise DatasetError(f"dataset {self.root}: no case {case_id!r}")

    def skeleton_reference(self, case_id: str) -> Path | None:
        """The optional reference skeleton map of a case in a lesion dataset (``skeletonTr/``)."""
        path = self.root / layout.SKELETON_REFERENCE_DIR / f"{case_id}{self.file_ending}"
        return path if path.is_file() else None


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset; ``case`` is ``None`` for dataset-wide problems."""

    case: str | None
    file: str
    message: str

    def __str__(self) -> str:
        where = f"case {self.case}" if self.case is not None else "dataset"
        return f"{where}: {self.file}: {self.message}"


# --------------------------------------------------------------------------- dataset.json


@dataclass
class _Spec:
    """What ``dataset.json`` declares; fields that failed validation are ``None``."""

    name: str
    channel_names: tuple[str, ...] | None
    labels: dict[str, int] | None
    file_ending: str
    subjects: dict[str, str]
    num_training: int | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_spec(root: Path) -> tuple[_Spec | None, list[Problem]]:
    """Parse and validate ``dataset.json``, collecting every problem instead of stopping."""
    path = root / layout.DATASET_JSON
    name = layout.DATASET_JSON

    def problem(message: str) -> Problem:
        return Problem(None, name, message)

    if not path.is_file():
        return None, [problem("missing (every dataset needs a dataset.json)")]
    duplicates: list[str] = []

    def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # json.load keeps the last of duplicated keys silently; a case declared twice must fail.
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        raw = json.loads(path.read_text(), object_pairs_hook=reject_duplicate_keys)
    except (OSError, UnicodeDecodeError) as err:
        return None, [problem(f"unreadable ({err})")]
    except json.JSONDecodeError as err:
        return None, [problem(f"malformed JSON: {err}")]
    if not isinstance(raw, dict):
        return None, [problem(f"must hold a JSON object, found {type(raw).__name__}")]

    problems = [problem(f"key {key!r} declared twice") for key in dict.fromkeys(duplicates)]
    channel_names = _parse_channel_names(raw, problems, problem)
    labels = _parse_labels(raw, problems, problem)

    file_ending = raw.get("file_ending", layout.FILE_ENDING)
    if file_ending not in SUPPORTED_FILE_ENDINGS:
        problems.append(
            problem(
                f"file_ending must be one of {list(SUPPORTED_FILE_ENDINGS)}, got {file_ending!r}"
            )
        )
        file_ending = layout.FILE_ENDING

    subjects: dict[str, str] = {}
    raw_subjects = raw.get("subjects", {})
    if not isinstance(raw_subjects, dict):
        problems.append(problem("subjects must be an object {case_id: subject_id}"))
    else:
        for case_id, subject in raw_subjects.items():
            if isinstance(subject, str) and subject:
                subjects[case_id] = subject
            else:
                problems.append(
                    problem(f"subjects[{case_id!r}] must be a non-empty string, got {subject!r}")
                )

    num_training = raw.get("numTraining")
    if num_training is not None and not _is_int(num_training):
        problems.append(problem(f"numTraining must be an integer, got {num_training!r}"))
        num_training = None

    dataset_name = raw.get("name", root.name)
    if not isinstance(dataset_name, str):
        problems.append(problem(f"name must be a string, got {dataset_name!r}"))
        dataset_name = root.name
    spec = _Spec(dataset_name, channel_names, labels, file_ending, subjects, num_training)
    return spec, problems


def _parse_channel_names(
    raw: dict, problems: list[Problem], problem: Callable[[str], Problem]
) -> tuple[str, ...] | None:
    if "channel_names" not in raw:
        problems.append(problem("missing key 'channel_names' (e.g. {'0': 'T1', '1': 'b1000'})"))
        return None
    value = raw["channel_names"]
    if not isinstance(value, dict) or not value:
        problems.append(problem(f"channel_names must be a non-empty object, got {value!r}"))
        return None
    expected = [str(index) for index in range(len(value))]
    if sorted(value, key=lambda k: (len(k), k)) != expected:
        problems.append(
            problem(f"channel_names keys must be '0'..'{len(value) - 1}', got {sorted(value)}")
        )
        return None
    names = [value[key] for key in expected]
    if not all(isinstance(name, str) and name for name in names):
        problems.append(problem(f"channel_names values must be non-empty strings, got {names}"))
        return None
    return tuple(names)


def _parse_labels(
    raw: dict, problems: list[Problem], problem: Callable[[str], Problem]
) -> dict[str, int] | None:
    if "labels" not in raw:
        problems.append(problem("missing key 'labels' (e.g. {'background': 0, 'lesion': 1})"))
        return None
    value = raw["labels"]
    if not isinstance(value, dict) or not value:
        problems.append(problem(f"labels must be a non-empty object, got {value!r}"))
        return None
    bad = {name: v for name, v in value.items() if not _is_int(v)}
    if bad:
        problems.append(problem(f"labels values must be integers, got {bad}"))
        return None
    if value.get("background") != 0:
        problems.append(problem("labels must map 'background' to 0"))
        return None
    if sorted(value.values()) != list(range(len(value))):
        problems.append(
            problem(f"labels values must be the integers 0..{len(value) - 1}, got {value}")
        )
        return None
    return dict(value)


# --------------------------------------------------------------------------- listing files


@dataclass
class _Listing:
    """Files found in imagesTr / labelsTr, grouped by case id."""

    images: dict[str, dict[int, Path]] = field(default_factory=dict)
    labels: dict[str, Path] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def _visible_files(folder: Path) -> list[Path]:
    """Files of a folder, ignoring hidden ones (temporary files of atomic writes, .DS_Store)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _list_files(root: Path, file_ending: str, n_channels: int | None) -> _Listing:
    listing = _Listing()
    image_name = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(file_ending)}$")
    other_endings = [e for e in SUPPORTED_FILE_ENDINGS if e != file_ending]
    for path in _visible_files(root / layout.IMAGES_DIR):
        rel = f"{layout.IMAGES_DIR}/{path.name}"
        match = image_name.match(path.name)
        if match is None or not path.is_file():
            listing.problems.append(_unexpected_file(rel, path, file_ending, other_endings))
            continue
        case_id, channel = match["case"], int(match["channel"])
        if n_channels is not None and channel >= n_channels:
            listing.problems.append(
                Problem(case_id, rel, f"channel {channel} is not declared in channel_names")
            )
            continue
        listing.images.setdefault(case_id, {})[channel] = path
    for path in _visible_files(root / layout.LABELS_DIR):
        rel = f"{layout.LABELS_DIR}/{path.name}"
        if not path.name.endswith(file_ending) or not path.is_file():
            listing.problems.append(_unexpected_file(rel, path, file_ending, other_endings))
            continue
        listing.labels[path.name[: -len(file_ending)]] = path
    return listing


def _unexpected_file(rel: str, path: Path, file_ending: str, other_endings: list[str]) -> Problem:
    if any(path.name.endswith(e) for e in other_endings):
        return Problem(
            None, rel, f"file ending differs from dataset.json file_ending {file_ending!r}"
        )
    return Problem(None, rel, f"unexpected entry (expected <case>_<XXXX>{file_ending} files)")


def _channel_path(root: Path, case_id: str, channel: int, file_ending: str) -> Path:
    return root / layout.IMAGES_DIR / f"{case_id}_{channel:04d}{file_ending}"


def _build_info(root: Path, spec: _Spec, listing: _Listing) -> DatasetInfo:
    channel_names = spec.channel_names or ()
    cases = []
    for case_id in sorted(listing.images):
        n_channels = len(channel_names) or max(listing.images[case_id]) + 1
        images = tuple(
            _channel_path(root, case_id, channel, spec.file_ending) for channel in range(n_channels)
        )
        subject_id = spec.subjects.get(case_id, case_id)
        cases.append(CaseFiles(case_id, subject_id, images, listing.labels.get(case_id)))
    return DatasetInfo(
        root=root,
        name=spec.name,
        channel_names=channel_names,
        labels=dict(spec.labels or {}),
        cases=cases,
        file_ending=spec.file_ending,
    )


def load_dataset(root: str | os.PathLike) -> DatasetInfo:
    """Read ``dataset.json`` and list the case files; no voxel is read.

    Raises ``DatasetError`` when the folder or ``dataset.json`` is missing or malformed. Problems
    with individual files are left to ``check_dataset``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset {root}: folder does not exist")
    spec, problems = _read_spec(root)
    if spec is None or problems:
        raise DatasetError(_format_problems(root, problems))
    listing = _list_files(root, spec.file_ending, len(spec.channel_names or ()))
    return _build_info(root, spec, listing)


# --------------------------------------------------------------------------- checking voxels


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
    """Read one file once: readability, dimensionality, non-finite voxels, label values.

    ``kind`` is ``"image"`` (intensities) or ``"label"`` (integer class map).
    """
    report = _FileReport()
    try:
        nifti = nib.load(path)
        data = np.asanyarray(nifti.dataobj)
        affine = np.asarray(nifti.affine, dtype=np.float64)
    except Exception as err:  # nibabel, gzip and zlib raise many types on corrupt files
        report.problems.append(f"unreadable or corrupt NIfTI ({type(err).__name__}: {err})")
        return report
    if data.ndim != 3:
        report.problems.append(f"not a 3D volume: shape {tuple(data.shape)}")
        return report
    if data.size == 0:
        report.problems.append(f"empty volume: shape {tuple(data.shape)}")
        return report
    report.shape = tuple(int(s) for s in data.shape)
    if not np.all(np.isfinite(affine)):
        report.problems.append("affine holds NaN/Inf")
    else:
        report.affine = affine
    is_float = data.dtype.kind in "fc"
    non_finite = non_integer = 0
    values: set[int] = set()
    for chunk in _slabs(data):
        if is_float:
            finite = np.isfinite(chunk)
            non_finite += int(chunk.size - np.count_nonzero(finite))
            if kind == "label":
                chunk = chunk[finite]
                whole = chunk == np.round(chunk)
                non_integer += int(chunk.size - np.count_nonzero(whole))
                chunk = chunk[whole]
        if kind == "label" and chunk.size:
            values |= _integer_values(chunk)
    if non_finite:
        report.problems.append(f"{non_finite} NaN/Inf voxels")
    if non_integer:
        report.problems.append(f"{non_integer} non-integer label values")
    if kind == "label":
        report.values = values
    return report


def _inspect_all(tasks: list[tuple[Path, str]], workers: int) -> list[_FileReport]:
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


def check_dataset(
    root: str | os.PathLike, require_labels: bool = True, workers: int = 1
) -> list[Problem]:
    """Report every problem of a dataset, each naming the case and the file.

    Every file is read exactly once (``workers`` processes in parallel). Checked: dataset.json
    (presence, JSON syntax, required keys and their types, keys declared twice), unreadable or
    corrupt NIfTI files, missing channels, missing labels (when ``require_labels``), labels
    without images, non-3D volumes, shape or affine mismatch between a case's files, NaN/Inf
    voxels, non-integer or undeclared label values, case ids that differ only by letter case,
    and an empty dataset. Files in ``skeletonTr/`` (optional) get the same checks as labels
    against the skeleton label set.
    """
    root = Path(root)
    if not root.is_dir():
        return [Problem(None, str(root), "dataset folder does not exist")]
    spec, problems = _read_spec(root)
    file_ending = spec.file_ending if spec else layout.FILE_ENDING
    channel_names = spec.channel_names if spec else None
    listing = _list_files(root, file_ending, len(channel_names) if channel_names else None)
    problems += listing.problems
    problems += _layout_problems(root, spec, listing, file_ending, require_labels)
    reads, missing = _plan_reads(root, listing, channel_names, file_ending, require_labels)
    problems += missing
    reports = _inspect_all([(path, kind) for path, kind, _owner in reads], workers)
    labels = spec.labels if spec else None
    problems += _cross_check([owner for _p, _k, owner in reads], reports, labels)
    # Dataset-wide problems first, then case by case.
    return sorted(problems, key=lambda p: (p.case is not None, p.case or "", p.file))


def _layout_problems(
    root: Path, spec: _Spec | None, listing: _Listing, file_ending: str, require_labels: bool
) -> list[Problem]:
    """Problems visible from the file names alone: folders, empty dataset, orphans, ids."""
    problems = []
    if not (root / layout.IMAGES_DIR).is_dir():
        problems.append(Problem(None, layout.IMAGES_DIR, "missing folder"))
    elif not listing.images:
        problems.append(
            Problem(None, layout.IMAGES_DIR, f"no cases (no <case>_0000{file_ending} files)")
        )
    if require_labels and not (root / layout.LABELS_DIR).is_dir():
        problems.append(Problem(None, layout.LABELS_DIR, "missing folder"))
    case_ids = sorted(listing.images)
    problems += _duplicate_case_problems(case_ids, file_ending)
    for case_id in sorted(set(listing.labels) - set(listing.images)):
        problems.append(
            Problem(case_id, f"{layout.LABELS_DIR}/{case_id}{file_ending}", "label without images")
        )
    for path in _visible_files(root / layout.SKELETON_REFERENCE_DIR):
        case_id = path.name[: -len(file_ending)] if path.name.endswith(file_ending) else None
        if case_id not in listing.images:
            rel = f"{layout.SKELETON_REFERENCE_DIR}/{path.name}"
            problems.append(Problem(case_id, rel, "skeleton reference without images"))
    if spec is not None:
        for case_id in sorted(set(spec.subjects) - set(case_ids)):
            problems.append(
                Problem(case_id, layout.DATASET_JSON, "subjects names a case that has no images")
            )
        if spec.num_training is not None and case_ids and spec.num_training != len(case_ids):
            message = f"numTraining is {spec.num_training} but {len(case_ids)} cases have images"
            problems.append(Problem(None, layout.DATASET_JSON, message))
    return problems


def _plan_reads(
    root: Path,
    listing: _Listing,
    channel_names: tuple[str, ...] | None,
    file_ending: str,
    require_labels: bool,
) -> tuple[list[tuple[Path, str, tuple[str, str, str]]], list[Problem]]:
    """The files to read per case (channels, label, skeleton reference) and the missing ones.

    Each read is ``(path, kind, (case_id, role, relative name))``; ``kind`` selects the voxel
    checks (``image`` or ``label``), ``role`` the label set values are checked against.
    """
    reads: list[tuple[Path, str, tuple[str, str, str]]] = []
    missing = []
    labels_dir_present = (root / layout.LABELS_DIR).is_dir()
    for case_id in sorted(listing.images):
        found = listing.images[case_id]
        for channel in range(len(channel_names)) if channel_names else sorted(found):
            rel = f"{layout.IMAGES_DIR}/{case_id}_{channel:04d}{file_ending}"
            if channel in found:
                reads.append((found[channel], "image", (case_id, "image", rel)))
            else:
                name = f" ({channel_names[channel]})" if channel_names else ""
                missing.append(Problem(case_id, rel, f"missing channel {channel}{name}"))
        rel = f"{layout.LABELS_DIR}/{case_id}{file_ending}"
        if case_id in listing.labels:
            reads.append((listing.labels[case_id], "label", (case_id, "label", rel)))
        elif require_labels and labels_dir_present:
            missing.append(Problem(case_id, rel, "missing label"))
        reference = root / layout.SKELETON_REFERENCE_DIR / f"{case_id}{file_ending}"
        if reference.is_file():
            rel = f"{layout.SKELETON_REFERENCE_DIR}/{reference.name}"
            reads.append((reference, "label", (case_id, "skeleton", rel)))
    return reads, missing


def _duplicate_case_problems(case_ids: list[str], file_ending: str) -> list[Problem]:
    by_folded: dict[str, list[str]] = {}
    for case_id in case_ids:
        by_folded.setdefault(case_id.casefold(), []).append(case_id)
    problems = []
    for group in by_folded.values():
        for case_id in group[1:]:
            problems.append(
                Problem(
                    case_id,
                    f"{layout.IMAGES_DIR}/{case_id}_0000{file_ending}",
                    f"duplicate case id: {case_id!r} and {group[0]!r} differ only by letter case",
                )
            )
    return problems


def _cross_check(
    owners: list[tuple[str, str, str]],
    reports: list[_FileReport],
    labels: dict[str, int] | None,
) -> list[Problem]:
    """Per-file problems, then shape/affine agreement with the case's first readable image."""
    problems: list[Problem] = []
    reference: dict[str, tuple[str, _FileReport]] = {}
    allowed = {
        "label": set(labels.values()) if labels else None,
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


def _format_problems(root: Path, problems: Sequence[Problem]) -> str:
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return f"dataset {root} has {count}:\n" + "\n".join(f"  {p}" for p in problems)


def require_valid_dataset(
    root: str | os.PathLike, require_labels: bool = True, workers: int = 1
) -> DatasetInfo:
    """Check the dataset and return its structure; raise ``DatasetError`` listing every problem."""
    root = Path(root)
    problems = check_dataset(root, require_labels=require_labels, workers=workers)
    if problems:
        raise DatasetError(_format_problems(root, problems))
    return load_dataset(root)


# --------------------------------------------------------------------------- reading arrays


def read_case_arrays(case: CaseFiles) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Load a case: image ``(C, X, Y, Z)`` float32, label ``(X, Y, Z)`` uint8 or ``None``, affine.

    The affine is the first channel's; the dataset check guarantees the others agree.
    """
    channels = []
    affine = np.eye(4)
    for index, path in enumerate(case.images):
        try:
            nifti = nib.load(path)
            channels.append(nifti.get_fdata(dtype=np.float32))
        except Exception as err:
            raise DatasetError(f"case {case.case_id}: {path}: unreadable ({err})") from err
        if index == 0:
            affine = np.asarray(nifti.affine, dtype=np.float64)
        elif channels[-1].shape != channels[0].shape:
            raise DatasetError(
                f"case {case.case_id}: {path}: shape {channels[-1].shape} differs from "
                f"{case.images[0]} {channels[0].shape}"
            )
    image = np.stack(channels)
    if case.label is None:
        return image, None, affine
    try:
        label = np.asanyarray(nib.load(case.label).dataobj)
    except Exception as err:
        raise DatasetError(f"case {case.case_id}: {case.label}: unreadable ({err})") from err
    if label.shape != image.shape[1:]:
        raise DatasetError(
            f"case {case.case_id}: {case.label}: shape {label.shape} differs from the image "
            f"{image.shape[1:]}"
        )
    if label.dtype.kind in "fc":
        label = np.rint(label)
    if label.size and (label.min() < 0 or label.max() > np.iinfo(np.uint8).max):
        raise DatasetError(f"case {case.case_id}: {case.label}: label values outside 0..255")
    return image, label.astype(np.uint8), affine

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

import hashlib
import inspect
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from sap_lightning.core.errors import DatasetError
from sap_lightning.dataset import layout
from sap_lightning.dataset.check_cache import CheckCache, decode, encode
from sap_lightning.dataset.images import (
    NIFTI_ENDINGS,
    SourceFrame,
    canonical_affine,
    canonical_shape,
    image_file_ending,
    read_image,
    to_canonical,
)
from sap_lightning.dataset.spec import DatasetSpec as _Spec
from sap_lightning.dataset.spec import (
    Problem,
    ambiguous_task_message,
    case_id_problems,
    task_problem,
)
from sap_lightning.dataset.spec import parse_labels as _parse_labels  # noqa: F401  (old name)
from sap_lightning.dataset.spec import read_spec as _read_spec

SUPPORTED_FILE_ENDINGS: tuple[str, ...] = layout.FILE_ENDINGS

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
    task_override: str | None = None
    """The task the user named (``--task``, the experiment's ``task``); ``None``: from labels."""

    @property
    def task(self) -> str:
        """``"lesion"`` or ``"skeleton"``: as named by the user, else from the label set.

        Raises ``DatasetError`` when the label set does not say (``layout.task_of_labels``).
        """
        task = self.task_override or layout.task_of_labels(self.labels)
        if task is None:
            raise DatasetError(f"dataset {self.root}: {ambiguous_task_message(self.labels)}")
        return task

    @property
    def task_labels(self) -> dict[str, int]:
        """The classes the task's network learns: the label set, or for a lesion task
        background and one lesion class (several foreground labels merged)."""
        return layout.lesion_labels(self.labels) if self.task == "lesion" else dict(self.labels)

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
    other_endings: dict[tuple[str, str], list[str]] = {}
    for path in _visible_files(root / layout.IMAGES_DIR):
        rel = f"{layout.IMAGES_DIR}/{path.name}"
        match = image_name.match(path.name)
        if match is None or not path.is_file():
            _unexpected_file(listing, other_endings, rel, path, file_ending)
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
            _unexpected_file(listing, other_endings, rel, path, file_ending)
            continue
        listing.labels[path.name[: -len(file_ending)]] = path
    for (folder, ending), names in other_endings.items():
        count = f"{len(names)} file{'s' if len(names) > 1 else ''}"
        listing.problems.append(
            Problem(
                None,
                folder,
                f"{count} end in {ending!r} but dataset.json file_ending is {file_ending!r} "
                f"(e.g. {names[0]}): set file_ending to {ending!r} or convert the files",
            )
        )
    return listing


def _unexpected_file(
    listing: _Listing,
    other_endings: dict[tuple[str, str], list[str]],
    rel: str,
    path: Path,
    file_ending: str,
) -> None:
    """Report an entry that is not a case file; files of another image ending are grouped (a
    dataset written with another ending would otherwise give one line per file)."""
    ending = next(
        (e for e in SUPPORTED_FILE_ENDINGS if e != file_ending and path.name.endswith(e)), None
    )
    if ending is not None and path.is_file() and not path.name.endswith(file_ending):
        folder = rel.split("/", 1)[0]
        other_endings.setdefault((folder, ending), []).append(path.name)
        return
    listing.problems.append(
        Problem(None, rel, f"unexpected entry (expected <case>_<XXXX>{file_ending} files)")
    )


def _channel_path(root: Path, case_id: str, channel: int, file_ending: str) -> Path:
    return root / layout.IMAGES_DIR / f"{case_id}_{channel:04d}{file_ending}"


def _build_info(root: Path, spec: _Spec, listing: _Listing, task: str | None = None) -> DatasetInfo:
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
        task_override=task,
    )


def load_dataset(root: str | os.PathLike, task: str | None = None) -> DatasetInfo:
    """Read ``dataset.json`` and list the case files; no voxel is read.

    ``task`` (``"lesion"`` or ``"skeleton"``) overrides the task the label set implies; it is
    needed when the label set does not say (``DatasetInfo.task`` raises then). Raises
    ``DatasetError`` when the folder or ``dataset.json`` is missing or malformed, or ``task`` is
    unusable. Problems with individual files are left to ``check_dataset``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset {root}: folder does not exist")
    spec, problems = _read_spec(root)
    if spec is not None and task is not None:
        problem = task_problem(spec.labels, task)
        problems += [problem] if problem is not None else []
    if spec is None or problems:
        raise DatasetError(_format_problems(root, problems))
    listing = _list_files(root, spec.file_ending, len(spec.channel_names or ()))
    return _build_info(root, spec, listing, task)


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


def _inspect_cached(
    root: Path, tasks: list[tuple[Path, str]], workers: int, use_cache: bool
) -> list[_FileReport]:
    """``_inspect_all`` that reads only files whose clean result is not remembered."""
    if not use_cache:
        return _inspect_all(tasks, workers)
    cache = CheckCache(root, _checks_version())
    looked_up = [cache.lookup(path, kind) for path, kind in tasks]
    reports: list[_FileReport | None] = []
    for stored, _print in looked_up:
        try:
            reports.append(decode(_FileReport, stored) if stored is not None else None)
        except (TypeError, ValueError, KeyError):  # a hand-edited or foreign entry: read again
            reports.append(None)
    todo = [index for index, report in enumerate(reports) if report is None]
    for index, report in zip(todo, _inspect_all([tasks[i] for i in todo], workers)):
        reports[index] = report
        if not report.problems:
            cache.store(*tasks[index], looked_up[index][1], encode(report))
    cache.save()
    return reports  # type: ignore[return-value]  (every None was replaced)


def check_dataset(
    root: str | os.PathLike,
    require_labels: bool = True,
    workers: int = 1,
    task: str | None = None,
    use_cache: bool = True,
) -> list[Problem]:
    """Report every problem of a dataset, each naming the case and the file.

    Every file is read exactly once (``workers`` processes in parallel). Checked: dataset.json
    (presence, JSON syntax, required keys and their types, keys declared twice), unreadable or
    corrupt NIfTI files, missing channels, missing labels (when ``require_labels``), labels
    without images, non-3D volumes, shape or affine mismatch between a case's files, NaN/Inf
    voxels, non-integer or undeclared label values, case ids that differ only by letter case
    or would share ``sap predict`` outputs, an empty dataset, and (labelled data) a label set
    that does not say which task it is for, unless ``task`` names it. Files in ``skeletonTr/``
    (optional) get the same checks as labels against the skeleton label set.

    Clean per-file results are remembered (``check_cache``, unless ``use_cache`` is false): a
    file unchanged since its last clean check is not read again.
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
    labels = spec.labels if spec else None
    undecided = task_problem(labels if require_labels else None, task)
    problems += [undecided] if undecided is not None else []
    tasks = [(path, kind) for path, kind, _owner in reads]
    reports = _inspect_cached(root, tasks, workers, use_cache)
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
    problems += case_id_problems(case_ids, file_ending)
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
    root: str | os.PathLike,
    require_labels: bool = True,
    workers: int = 1,
    task: str | None = None,
) -> DatasetInfo:
    """Check the dataset and return its structure; raise ``DatasetError`` listing every problem.

    ``task`` names the task when the label set does not (see ``check_dataset``).
    """
    root = Path(root)
    problems = check_dataset(root, require_labels=require_labels, workers=workers, task=task)
    if problems:
        raise DatasetError(_format_problems(root, problems))
    return load_dataset(root, task=task)


def check_case_files(
    case_id: str,
    image_paths: Sequence[Path],
    label_path: Path | None = None,
    *,
    channel_names: Sequence[str] | None = None,
    labels: dict[str, int] | None = None,
    workers: int = 1,
) -> list[Problem]:
    """Every problem of one case's files, with the checks ``check_dataset`` runs per file.

    For inputs without a ``dataset.json`` (a plain folder of ``<case>_XXXX`` files): missing
    channel files, unreadable or non-3D files, NaN/Inf voxels, constant images, and channels
    (and the label) whose canonical grid differs from the first channel's beyond
    ``AFFINE_TOLERANCE_MM``. ``labels`` (a label set) also checks the label's values.
    """
    problems: list[Problem] = []
    reads: list[tuple[Path, str, tuple[str, str, str]]] = []
    for channel, path in enumerate(image_paths):
        path = Path(path)
        rel = f"{path.parent.name}/{path.name}"
        if path.is_file():
            reads.append((path, "image", (case_id, "image", rel)))
        else:
            name = f" ({channel_names[channel]})" if channel_names else ""
            problems.append(Problem(case_id, rel, f"missing channel {channel}{name}"))
    if label_path is not None:
        label_path = Path(label_path)
        rel = f"{label_path.parent.name}/{label_path.name}"
        if label_path.is_file():
            reads.append((label_path, "label", (case_id, "label", rel)))
        else:
            problems.append(Problem(case_id, rel, "missing label"))
    reports = _inspect_all([(path, kind) for path, kind, _owner in reads], workers)
    problems += _cross_check([owner for _p, _k, owner in reads], reports, labels)
    return problems


# --------------------------------------------------------------------------- reading arrays


@dataclass
class CaseArrays:
    """A case read into the canonical RAS+ frame, and the frame its first channel came in."""

    image: np.ndarray
    """``(C, X, Y, Z)`` float32, canonical voxel order."""
    label: np.ndarray | None
    """``(X, Y, Z)`` uint8, canonical voxel order, or ``None``."""
    affine: np.ndarray
    """Canonical voxel index -> RAS+ mm."""
    source: SourceFrame
    """The first channel's own frame: results are written back in it."""


def read_case(case: CaseFiles) -> CaseArrays:
    """Load a case and bring every file to the canonical RAS+ frame (``images.to_canonical``).

    Each file is reoriented by its own affine, so channels stored in different voxel orders on
    the same world grid line up; the dataset check (``check_case_files``) guarantees they do.
    """
    channels = []
    affine = np.eye(4)
    source: SourceFrame | None = None
    for index, path in enumerate(case.images):
        try:
            loaded = read_image(path, np.float32)
        except Exception as err:
            raise DatasetError(f"case {case.case_id}: {path}: unreadable ({err})") from err
        if loaded.data.ndim != 3:
            raise DatasetError(
                f"case {case.case_id}: {path}: not a 3D volume: shape {loaded.data.shape}"
            )
        array, file_affine = to_canonical(loaded.data, loaded.affine)
        channels.append(array)
        if index == 0:
            affine, source = file_affine, SourceFrame.of(loaded)
        elif channels[-1].shape != channels[0].shape:
            raise DatasetError(
                f"case {case.case_id}: {path}: canonical shape {channels[-1].shape} differs from "
                f"{case.images[0]} {channels[0].shape}"
            )
    assert source is not None, "a case has at least one channel"
    image = np.stack(channels)
    del channels
    if case.label is None:
        return CaseArrays(image, None, affine, source)
    try:
        loaded = read_image(case.label)
        label, _ = to_canonical(np.asarray(loaded.data), loaded.affine)
    except Exception as err:
        raise DatasetError(f"case {case.case_id}: {case.label}: unreadable ({err})") from err
    if label.shape != image.shape[1:]:
        raise DatasetError(
            f"case {case.case_id}: {case.label}: canonical shape {label.shape} differs from the "
            f"image {image.shape[1:]}"
        )
    if label.dtype.kind in "fc":
        label = np.rint(label)
    if label.size and (label.min() < 0 or label.max() > np.iinfo(np.uint8).max):
        raise DatasetError(f"case {case.case_id}: {case.label}: label values outside 0..255")
    return CaseArrays(image, label.astype(np.uint8), affine, source)


def read_case_arrays(case: CaseFiles) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Load a case in the canonical RAS+ frame: image ``(C, X, Y, Z)`` float32, label
    ``(X, Y, Z)`` uint8 or ``None``, and the canonical affine (see :func:`read_case`)."""
    arrays = read_case(case)
    return arrays.image, arrays.label, arrays.affine

"""Validating datasets in the nnU-Net v2 raw layout (see ``layout.py``): dataset-level checks.

Three levels of cost:

- ``load_dataset`` (``info.py``) reads ``dataset.json`` and lists files: cheap, structure only.
- ``check_dataset`` reads every voxel of every file once and reports *every* problem it finds,
  each naming the case and the file, so a user fixes a broken dataset in one pass.
- ``require_valid_dataset`` runs the check and raises ``DatasetError`` listing all problems; every
  training, preprocessing and evaluation command calls it first, so nothing starts on a broken
  dataset.

This module decides what a dataset (or one case given as plain files, ``check_case_files``)
must contain; what reading one file finds is ``file_checks.py``'s job.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from sap_lightning.core.errors import DatasetError
from sap_lightning.dataset import layout
from sap_lightning.dataset.file_checks import cross_check, inspect_cached, inspect_files
from sap_lightning.dataset.info import (
    DatasetInfo,
    FileListing,
    format_problems,
    list_files,
    load_dataset,
    visible_files,
)
from sap_lightning.dataset.spec import DatasetSpec as _Spec
from sap_lightning.dataset.spec import Problem, case_id_problems, read_spec, task_problem

__all__ = ["check_case_files", "check_dataset", "require_valid_dataset"]
"""Dataset-level checks live here; the reading API (``DatasetInfo``, ``CaseFiles``,
``load_dataset``, ``read_case``) is ``dataset/info.py``'s, ``Problem`` ``dataset/spec.py``'s."""


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
    spec, problems = read_spec(root)
    file_ending = spec.file_ending if spec else layout.FILE_ENDING
    channel_names = spec.channel_names if spec else None
    listing = list_files(root, file_ending, len(channel_names) if channel_names else None)
    problems += listing.problems
    problems += _layout_problems(root, spec, listing, file_ending, require_labels)
    reads, missing = _plan_reads(root, listing, channel_names, file_ending, require_labels)
    problems += missing
    labels = spec.labels if spec else None
    undecided = task_problem(labels if require_labels else None, task)
    problems += [undecided] if undecided is not None else []
    tasks = [(path, kind) for path, kind, _owner in reads]
    reports = inspect_cached(root, tasks, workers, use_cache)
    label_values = spec.label_values if spec else None
    problems += cross_check([owner for _p, _k, owner in reads], reports, label_values)
    # Dataset-wide problems first, then case by case.
    return sorted(problems, key=lambda p: (p.case is not None, p.case or "", p.file))


def _layout_problems(
    root: Path, spec: _Spec | None, listing: FileListing, file_ending: str, require_labels: bool
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
    for path in visible_files(root / layout.SKELETON_REFERENCE_DIR):
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
    listing: FileListing,
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
        raise DatasetError(format_problems(root, problems))
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
    reports = inspect_files([(path, kind) for path, kind, _owner in reads], workers)
    label_values = set(labels.values()) if labels else None
    problems += cross_check([owner for _p, _k, owner in reads], reports, label_values)
    return problems

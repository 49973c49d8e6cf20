"""What a dataset folder holds and how its cases are read: the DatasetInfo/reading API.

``load_dataset`` reads ``dataset.json`` and lists the files of ``imagesTr``/``labelsTr`` (no voxel
is read) into a ``DatasetInfo``; ``read_case`` loads one case's files into the canonical RAS+
frame. Checking the files is ``validate.py``'s job (``check_dataset``, ``require_valid_dataset``),
which lists files with the same ``list_files``, so the check and the readers never disagree on
what a dataset contains.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sap_lightning.core.errors import DatasetError
from sap_lightning.dataset import layout
from sap_lightning.dataset.images import SourceFrame, read_image, to_canonical
from sap_lightning.dataset.spec import DatasetSpec as _Spec
from sap_lightning.dataset.spec import Problem, ambiguous_task_message, read_spec, task_problem

SUPPORTED_FILE_ENDINGS: tuple[str, ...] = layout.FILE_ENDINGS


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
    ignore_value: int | None = None
    """The value of nnU-Net's ``ignore`` label in the label files (``None``: not declared);
    ``labels`` holds the classes only."""

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
class FileListing:
    """Files found in imagesTr / labelsTr, grouped by case id."""

    images: dict[str, dict[int, Path]] = field(default_factory=dict)
    labels: dict[str, Path] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def visible_files(folder: Path) -> list[Path]:
    """Files of a folder, ignoring hidden ones (temporary files of atomic writes, .DS_Store)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def list_files(root: Path, file_ending: str, n_channels: int | None) -> FileListing:
    """The case files of ``imagesTr``/``labelsTr`` by case id, and the entries that are not
    (each a problem): the one listing both ``load_dataset`` and the dataset check use."""
    listing = FileListing()
    image_name = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(file_ending)}$")
    other_endings: dict[tuple[str, str], list[str]] = {}
    for path in visible_files(root / layout.IMAGES_DIR):
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
    for path in visible_files(root / layout.LABELS_DIR):
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
    listing: FileListing,
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


def _build_info(
    root: Path, spec: _Spec, listing: FileListing, task: str | None = None
) -> DatasetInfo:
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
        ignore_value=spec.ignore_value,
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
    spec, problems = read_spec(root)
    if spec is not None and task is not None:
        problem = task_problem(spec.labels, task)
        problems += [problem] if problem is not None else []
    if spec is None or problems:
        raise DatasetError(format_problems(root, problems))
    listing = list_files(root, spec.file_ending, len(spec.channel_names or ()))
    return _build_info(root, spec, listing, task)


def format_problems(root: Path, problems: Sequence[Problem]) -> str:
    """The ``DatasetError`` text: a count, then one problem per line."""
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return f"dataset {root} has {count}:\n" + "\n".join(f"  {p}" for p in problems)


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

"""Convert per-case folders (``<case>/T1.nii.gz``, ...) to the nnU-Net v2 raw layout.

Sources may be ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``; the dataset is written as ``.nii.gz``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sap_lightning.core.errors import DatasetError
from sap_lightning.core.io import atomic_dir, atomic_path, write_json
from sap_lightning.dataset import layout
from sap_lightning.dataset.images import read_image
from sap_lightning.dataset.info import SUPPORTED_FILE_ENDINGS, DatasetInfo, load_dataset
from sap_lightning.dataset.spec import Problem, parse_labels

# --------------------------------------------------------------------------- import


_DEFAULT_LABEL_FILE = {"lesion": "lesions", "skeleton": "skeleton"}


def resolve_labels(labels: str | os.PathLike | Mapping[str, int]) -> tuple[dict[str, int], str]:
    """A label set from ``"lesion"``, ``"skeleton"``, a mapping or a JSON file; with its kind."""
    if isinstance(labels, Mapping):
        return dict(labels), "custom"
    if labels == "lesion":
        return dict(layout.LESION_LABELS), "lesion"
    if labels == "skeleton":
        return dict(layout.SKELETON_LABELS), "skeleton"
    path = Path(labels)
    if not path.is_file():
        raise DatasetError(
            f"labels must be 'lesion', 'skeleton' or a JSON file of {{name: value}}; "
            f"{path}: no such file"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: unreadable label set ({err})") from err
    if isinstance(raw, dict) and isinstance(raw.get("labels"), dict):
        raw = raw["labels"]  # a dataset.json-like file
    problems: list[Problem] = []
    parsed = parse_labels({"labels": raw}, problems, lambda m: Problem(None, str(path), m))
    if parsed is None:
        raise DatasetError("; ".join(str(p) for p in problems))
    return parsed, "custom"


def import_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    labels: str | os.PathLike | Mapping[str, int] = "lesion",
    label_name: str | None = None,
    channel_files: Sequence[str] = layout.CHANNEL_NAMES,
    subjects: Mapping[str, str] | None = None,
    require_labels: bool = True,
    name: str | None = None,
) -> DatasetInfo:
    """Convert ``SRC/<case>/{T1,b1000,<label_name>}<ending>`` into the nnU-Net v2 raw layout.

    ``labels`` is ``"lesion"`` (label file ``lesions``), ``"skeleton"`` (label file
    ``skeleton``) or a JSON file ``{name: value}``; ``label_name`` overrides the label file's
    name (without ending). In a lesion import a ``<case>/skeleton.nii[.gz]`` file, when present,
    is kept as the reference skeleton map in ``skeletonTr/``. ``subjects`` maps case ids to
    subject ids (cases not listed are their own subject).

    Every missing file of every case is reported at once before anything is written; the output
    folder appears complete or not at all, and an existing non-empty OUT is never overwritten.
    """
    src, out = Path(src), Path(out)
    label_set, kind = resolve_labels(labels)
    label_name = label_name or _DEFAULT_LABEL_FILE.get(kind, "label")
    if not src.is_dir():
        raise DatasetError(f"import: {src}: source folder does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"import: {out}: output exists and is not empty; choose another folder")

    def find(case_dir: Path, stem: str) -> Path | None:
        for ending in SUPPORTED_FILE_ENDINGS:
            if (case_dir / f"{stem}{ending}").is_file():
                return case_dir / f"{stem}{ending}"
        return None

    case_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not case_dirs:
        raise DatasetError(f"import: {src}: no case folders (<case>/T1.nii.gz, ...)")
    missing: list[str] = []
    plan: list[tuple[str, list[Path], Path | None, Path | None]] = []
    for case_dir in case_dirs:
        images = [find(case_dir, stem) for stem in channel_files]
        for stem, path in zip(channel_files, images):
            if path is None:
                missing.append(f"case {case_dir.name}: {case_dir / stem}.nii.gz: missing channel")
        label = find(case_dir, label_name)
        if label is None and require_labels:
            missing.append(f"case {case_dir.name}: {case_dir / label_name}.nii.gz: missing label")
        reference = find(case_dir, "skeleton") if kind == "lesion" else None
        plan.append((case_dir.name, images, label, reference))
    unknown = sorted(set(subjects or {}) - {case_dir.name for case_dir in case_dirs})
    missing += [
        f"case {case_id}: subjects names a case with no folder in {src}" for case_id in unknown
    ]
    if missing:
        raise DatasetError(
            f"import from {src}: {len(missing)} problems:\n  " + "\n  ".join(missing)
        )

    with atomic_dir(out) as tmp:
        for case_id, images, label, reference in plan:
            for channel, path in enumerate(images):
                _copy_as_nifti_gz(path, layout.image_path(tmp, case_id, channel))
            if label is not None:
                _copy_as_nifti_gz(label, layout.label_path(tmp, case_id))
            if reference is not None:
                _copy_as_nifti_gz(reference, layout.skeleton_reference_path(tmp, case_id))
        spec: dict[str, Any] = {
            "name": name or out.name,
            "channel_names": {str(i): channel for i, channel in enumerate(channel_files)},
            "labels": label_set,
            "numTraining": len(plan),
            "file_ending": layout.FILE_ENDING,
        }
        if subjects:
            spec["subjects"] = {case_id: subjects[case_id] for case_id in sorted(subjects)}
        write_json(tmp / layout.DATASET_JSON, spec)
    return load_dataset(out)


def _copy_as_nifti_gz(source: Path, target: Path) -> None:
    """Copy a ``.nii.gz`` file as it is; other endings are converted (voxel order, values and
    RAS affine kept: ``images.read_image``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.name.endswith(".nii.gz"):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return
    try:
        image = read_image(source)
    except Exception as err:  # nibabel, SimpleITK and gzip raise many types on corrupt files
        raise DatasetError(f"import: {source}: unreadable image file ({err})") from err
    layout.save_nifti(target, np.asarray(image.data), image.affine)

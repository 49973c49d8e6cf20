"""The dataset format: nnU-Net v2 raw layout, label sets and file names, shared by every command.

A dataset folder holds ``dataset.json``, ``imagesTr/<case>_<XXXX>.nii.gz`` (one file per channel)
and ``labelsTr/<case>.nii.gz``. ``dataset.json`` may carry an optional ``subjects`` mapping
``{case_id: subject_id}`` so that scans of one person stay in one fold. Extra keys are allowed,
as in nnU-Net.

Arrays are always in the NIfTI file's voxel order (nibabel's ``get_fdata`` order) and spacings
are in mm in that same order.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from sap_lightning.core.io import atomic_path

CHANNEL_NAMES: tuple[str, ...] = ("T1", "b1000")
"""Network input channels, in order (docs/method.md: T1-weighted and DWI b=1000)."""

SKELETON_LABELS: dict[str, int] = {
    "background": 0,
    "cervical_spine": 1,
    "thoracic_spine": 2,
    "lumbar_spine": 3,
    "pelvis": 4,
    "femurs": 5,
    "humeri": 6,
    "scapulae": 7,
    "clavicles": 8,
    "sternum": 9,
}
"""Stage-1 label set: background + the paper's 9 skeletal regions (ribs are not labelled)."""

LESION_LABELS: dict[str, int] = {"background": 0, "lesion": 1}
"""Stage-2 label set: binary metastasis mask."""

DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
SKELETON_REFERENCE_DIR = "skeletonTr"
"""Optional folder in a lesion dataset with per-case skeleton maps (the synthetic cohort has
them); used to report lesion counts per skeletal region, never as a network input."""
FILE_ENDING = ".nii.gz"
SPLITS_JSON = "splits.json"


def default_cache_path(dataset: str | os.PathLike) -> Path:
    """Where a dataset's preprocessing cache lives unless told otherwise:
    ``<dataset>/../cache/<dataset name>`` (outside the dataset, which stays untouched)."""
    dataset = Path(dataset)
    return dataset.parent / "cache" / dataset.name


def default_splits_path(dataset: str | os.PathLike) -> Path:
    """``<dataset>/splits.json``."""
    return Path(dataset) / SPLITS_JSON


def task_of_labels(labels: dict[str, int]) -> str:
    """Name the task a label set belongs to: ``"lesion"`` (binary) or ``"skeleton"``."""
    return "lesion" if set(labels) == set(LESION_LABELS) else "skeleton"


def image_path(root: str | os.PathLike, case_id: str, channel: int) -> Path:
    return Path(root) / IMAGES_DIR / f"{case_id}_{channel:04d}{FILE_ENDING}"


def label_path(root: str | os.PathLike, case_id: str) -> Path:
    return Path(root) / LABELS_DIR / f"{case_id}{FILE_ENDING}"


def skeleton_reference_path(root: str | os.PathLike, case_id: str) -> Path:
    return Path(root) / SKELETON_REFERENCE_DIR / f"{case_id}{FILE_ENDING}"


def affine_from_spacing(spacing: tuple[float, float, float]) -> np.ndarray:
    """A diagonal affine with the given voxel spacing and the origin at voxel (0, 0, 0)."""
    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = spacing
    return affine


PROBABILITY_SCALE = 65535
"""Probabilities are stored as uint16 with slope 1/65535: NIfTI has no float16 type, and 16 bits
keep 1.5e-5 resolution at half the size of float32."""


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``array`` as NIfTI atomically; the data type of ``array`` is kept."""
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(np.asarray(array).dtype)
    return _save_atomic(path, image)


def save_probability_nifti(
    path: str | os.PathLike, probability: np.ndarray, affine: np.ndarray
) -> Path:
    """Write a probability map in [0, 1] as 16-bit NIfTI (readers get floats via the slope)."""
    scaled = np.rint(np.clip(probability, 0.0, 1.0) * PROBABILITY_SCALE).astype(np.uint16)
    image = nib.Nifti1Image(scaled, np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(np.uint16)
    image.header.set_slope_inter(1.0 / PROBABILITY_SCALE, 0.0)
    return _save_atomic(path, image)


def _save_atomic(path: str | os.PathLike, image: nib.Nifti1Image) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        # nibabel picks compression from the suffix, so the temporary name keeps it.
        tmp_with_suffix = tmp.with_name(tmp.name + "".join(path.suffixes))
        try:
            nib.save(image, tmp_with_suffix)
            os.replace(tmp_with_suffix, tmp)
        finally:
            if tmp_with_suffix.exists():
                tmp_with_suffix.unlink()
    return path


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm along each array axis, from an affine (column norms)."""
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return (float(spacing[0]), float(spacing[1]), float(spacing[2]))

"""Cases and the cohort: healthy scans and patients written as nnU-Net datasets."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sap_lightning.core.errors import ConfigError, DatasetError
from sap_lightning.core.io import atomic_dir, write_json
from sap_lightning.dataset import layout
from sap_lightning.synthetic.anatomy import (
    ScanPose,
    SubjectAnatomy,
    make_subject_anatomy,
    sample_scan_pose,
)
from sap_lightning.synthetic.images import render_images
from sap_lightning.synthetic.lesions import (
    Lesion,
    place_lesions,
    sample_lesion_count,
    sample_lesion_volumes_ml,
)
from sap_lightning.synthetic.rasterize import AnatomyMaps, render_anatomy
from sap_lightning.synthetic.tissues import (
    DEFAULT_HEALTHY,
    DEFAULT_PATIENTS,
    DEFAULT_SIZE,
    SIZES,
    SKELETON_CLASSES,
)

log = logging.getLogger(__name__)

_STREAM_VOLUNTEER, _STREAM_HEALTHY_SCAN, _STREAM_PATIENT, _STREAM_PATIENT_SCAN = 0, 1, 2, 3
_STREAM_VOLUNTEER_SCANS = 4

# --------------------------------------------------------------------------------------------
# Cases and the cohort
# --------------------------------------------------------------------------------------------


@dataclass
class PhantomCase:
    """One rendered scan with its ground truth and the anatomy maps behind it."""

    case_id: str
    subject_id: str
    t1: np.ndarray
    b1000: np.ndarray
    maps: AnatomyMaps
    lesion_ids: np.ndarray
    lesions: list[Lesion]
    anatomy: SubjectAnatomy
    pose: ScanPose

    @property
    def skeleton(self) -> np.ndarray:
        return self.maps.skeleton

    @property
    def lesion_mask(self) -> np.ndarray:
        return (self.lesion_ids > 0).astype(np.uint8)


def fov_of(shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, float, float]:
    """Field of view (mm): the extent of the voxel grid along each axis."""
    x, y, z = (n * s for n, s in zip(shape, spacing))
    return float(x), float(y), float(z)


def volunteer_of_scan(seed: int, index: int) -> tuple[int, int]:
    """(volunteer, scan number) of healthy case ``index``: volunteers have 1-3 scans each.

    Scan counts come from each volunteer's own generator, so the mapping of case ``index``
    does not depend on how many healthy cases are generated.
    """
    volunteer, first = 0, 0
    while True:
        n_scans = int(
            np.random.default_rng([seed, _STREAM_VOLUNTEER_SCANS, volunteer]).integers(1, 4)
        )
        if index < first + n_scans:
            return volunteer, index - first
        first += n_scans
        volunteer += 1


def check_skeleton_map(
    case_id: str, skeleton: np.ndarray, shape: Sequence[int], spacing: Sequence[float]
) -> None:
    """Every skeletal class must be present and nothing cut off by the field of view."""
    grid = f"a {tuple(shape)} grid at {tuple(spacing)} mm"
    present = set(np.unique(skeleton).tolist())
    missing = [name for name, value in SKELETON_CLASSES.items() if value not in present]
    if missing:
        raise DatasetError(
            f"phantom case {case_id}: skeletal region(s) {', '.join(missing)} have no voxel on "
            f"{grid}; use a finer --spacing or a preset --size"
        )
    border = np.zeros(skeleton.shape, bool)
    border[[0, -1], :, :] = border[:, [0, -1], :] = border[:, :, [0, -1]] = True
    if np.any(skeleton[border] > 0):
        raise DatasetError(
            f"phantom case {case_id}: the skeleton reaches the image border on {grid}; use a "
            "finer --spacing or a preset --size"
        )


def volunteer_anatomy(seed: int, volunteer: int, fov_mm: Sequence[float]) -> SubjectAnatomy:
    """The body of healthy volunteer ``volunteer`` (the same in all of their scans)."""
    rng = np.random.default_rng([seed, _STREAM_VOLUNTEER, volunteer])
    return make_subject_anatomy(rng, fov_mm)


def patient_anatomy(seed: int, index: int, fov_mm: Sequence[float]) -> SubjectAnatomy:
    """The body of patient ``index``."""
    return make_subject_anatomy(np.random.default_rng([seed, _STREAM_PATIENT, index]), fov_mm)


def render_case(
    case_id: str,
    subject_id: str,
    anatomy: SubjectAnatomy,
    rng: np.random.Generator,
    shape: Sequence[int],
    spacing: Sequence[float],
    with_lesions: bool,
) -> PhantomCase:
    """One scan of ``anatomy``: pose, anatomy maps, metastases (patients only) and images."""
    pose = sample_scan_pose(rng, anatomy)
    maps = render_anatomy(anatomy, pose, shape, spacing)
    check_skeleton_map(case_id, maps.skeleton, shape, spacing)
    if with_lesions:
        volumes = sample_lesion_volumes_ml(rng, sample_lesion_count(rng))
        ids, lesions = place_lesions(rng, maps, spacing, volumes)
    else:
        ids, lesions = np.zeros(maps.tissue.shape, np.int16), []
    t1, b1000 = render_images(rng, anatomy, maps, ids, spacing)
    return PhantomCase(case_id, subject_id, t1, b1000, maps, ids, lesions, anatomy, pose)


def generate_healthy_case(
    seed: int, index: int, shape: Sequence[int], spacing: Sequence[float]
) -> PhantomCase:
    """Healthy scan ``index`` (``healthy_XXX``) of volunteer ``volunteer_YY``."""
    volunteer, _ = volunteer_of_scan(seed, index)
    anatomy = volunteer_anatomy(seed, volunteer, fov_of(shape, spacing))
    rng = np.random.default_rng([seed, _STREAM_HEALTHY_SCAN, index])
    return render_case(
        f"healthy_{index:03d}", f"volunteer_{volunteer:02d}", anatomy, rng, shape, spacing, False
    )


def generate_patient_case(
    seed: int, index: int, shape: Sequence[int], spacing: Sequence[float]
) -> PhantomCase:
    """Patient ``index`` (``patient_XXX``, one scan, subject = case) with 0-12 metastases."""
    anatomy = patient_anatomy(seed, index, fov_of(shape, spacing))
    rng = np.random.default_rng([seed, _STREAM_PATIENT_SCAN, index])
    case_id = f"patient_{index:03d}"
    return render_case(case_id, case_id, anatomy, rng, shape, spacing, True)


@dataclass(frozen=True)
class CohortPaths:
    """The two datasets a cohort is written as."""

    root: Path
    skeleton: Path
    lesion: Path


def resolve_grid(
    size: str | None = None,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Pick the grid from a preset name or an explicit shape and spacing (given together)."""
    if size is not None and (shape is not None or spacing is not None):
        raise ConfigError("give either a size preset or --shape and --spacing, not both")
    if (shape is None) != (spacing is None):
        raise ConfigError("--shape and --spacing must be given together")
    if shape is None:
        name = size or DEFAULT_SIZE
        if name not in SIZES:
            raise ConfigError(f"unknown size {name!r}; choose one of {', '.join(SIZES)}")
        return SIZES[name]
    if len(shape) != 3 or len(spacing) != 3:
        raise ConfigError(f"shape and spacing need 3 values each, got {shape} and {spacing}")
    if any(int(n) != n or n < 16 for n in shape):
        raise ConfigError(f"shape {tuple(shape)}: each axis must be an integer >= 16 voxels")
    if any(not (s > 0 and math.isfinite(s)) for s in spacing):
        raise ConfigError(f"spacing {tuple(spacing)}: each value must be a positive number (mm)")
    return tuple(int(n) for n in shape), tuple(float(s) for s in spacing)  # type: ignore[return-value]


def _write_case(case: PhantomCase, root: Path, affine: np.ndarray, task: str) -> None:
    layout.save_nifti(layout.image_path(root, case.case_id, 0), case.t1, affine)
    layout.save_nifti(layout.image_path(root, case.case_id, 1), case.b1000, affine)
    if task == "skeleton":
        layout.save_nifti(layout.label_path(root, case.case_id), case.skeleton, affine)
    else:
        layout.save_nifti(layout.label_path(root, case.case_id), case.lesion_mask, affine)
        layout.save_nifti(layout.skeleton_reference_path(root, case.case_id), case.skeleton, affine)


def _make_and_write(job: tuple[str, int, int, tuple, tuple, str]) -> dict:
    """Worker: generate one case and write its files; returns what dataset.json needs."""
    task, seed, index, shape, spacing, root = job
    generate = generate_healthy_case if task == "skeleton" else generate_patient_case
    case = generate(seed, index, shape, spacing)
    _write_case(case, Path(root), layout.affine_from_spacing(spacing), task)
    return {
        "case": case.case_id,
        "subject": case.subject_id,
        "lesion_volumes_ml": [round(les.volume_ml, 4) for les in case.lesions],
    }


def _dataset_json(task: str, records: list[dict], seed: int, shape, spacing) -> dict:
    labels = layout.SKELETON_LABELS if task == "skeleton" else layout.LESION_LABELS
    spec = {
        "name": f"phantom_{task}",
        "description": (
            "Synthetic whole-body MRI (sap_lightning.synthetic): "
            + (
                "healthy volunteers, skeleton labels (ribs unlabelled)"
                if task == "skeleton"
                else "patients, bone-metastasis masks; skeletonTr holds the skeleton maps"
            )
        ),
        "channel_names": {str(i): name for i, name in enumerate(layout.CHANNEL_NAMES)},
        "labels": dict(labels),
        "numTraining": len(records),
        "file_ending": layout.FILE_ENDING,
        "subjects": {r["case"]: r["subject"] for r in records},
        "phantom": {"seed": seed, "shape": list(shape), "spacing": list(spacing)},
    }
    if task == "lesion":
        spec["phantom"]["lesion_volumes_ml"] = {r["case"]: r["lesion_volumes_ml"] for r in records}
    return spec


def make_phantom_cohort(
    out: str | os.PathLike,
    n_healthy: int = DEFAULT_HEALTHY,
    n_patients: int = DEFAULT_PATIENTS,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    overwrite: bool = False,
    workers: int = 1,
) -> CohortPaths:
    """Write the synthetic cohort as ``out/skeleton`` (healthy) and ``out/lesion`` (patients).

    ``shape``/``spacing`` default to the ``small`` preset. Existing datasets at those two paths
    are replaced only with ``overwrite=True``; nothing else in ``out`` is touched. Each dataset
    is built in a temporary folder and renamed into place when complete, so an interrupted run
    never leaves a partial dataset (nor destroys the previous one).
    """
    grid, vox = resolve_grid(shape=shape, spacing=spacing)
    if n_healthy < 1 or n_patients < 1:
        raise ConfigError(
            f"need at least one healthy scan and one patient, got {n_healthy}, {n_patients}"
        )
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root}: exists and is not a folder")
    paths = CohortPaths(root, root / "skeleton", root / "lesion")
    existing = [p for p in (paths.skeleton, paths.lesion) if p.exists()]
    if existing and not overwrite:
        raise DatasetError(
            f"{', '.join(map(str, existing))} already exist; pass --overwrite (overwrite=True) to "
            "replace the phantom datasets (other content of the folder is kept)"
        )
    # Both datasets are built in temporary folders and renamed into place only once both are
    # complete: a failure (say a grid too coarse for some patient) leaves nothing behind.
    with atomic_dir(paths.skeleton) as skeleton_tmp, atomic_dir(paths.lesion) as lesion_tmp:
        for task, count, tmp in (
            ("skeleton", n_healthy, skeleton_tmp),
            ("lesion", n_patients, lesion_tmp),
        ):
            jobs = [(task, seed, i, grid, vox, str(tmp)) for i in range(count)]
            if workers > 1:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    records = list(pool.map(_make_and_write, jobs))
            else:
                records = [_make_and_write(job) for job in jobs]
            write_json(tmp / layout.DATASET_JSON, _dataset_json(task, records, seed, grid, vox))
    log.info(
        "wrote %d healthy scans to %s and %d patients to %s",
        n_healthy,
        paths.skeleton,
        n_patients,
        paths.lesion,
    )
    return paths

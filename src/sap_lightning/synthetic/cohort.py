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
from sap_lightning.core.io import atomic_dir, read_json, write_json
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
from sap_lightning.synthetic.mimic_table import MIMIC_KINDS
from sap_lightning.synthetic.mimics import Mimic, PlannedMimic, place_mimics, plan_mimics
from sap_lightning.synthetic.rasterize import AnatomyMaps, render_anatomy
from sap_lightning.synthetic.sites import PATIENT_SITE, SITES, volunteer_site
from sap_lightning.synthetic.tissues import (
    BONE_TISSUES,
    DEFAULT_HEALTHY,
    DEFAULT_PATIENTS,
    DEFAULT_SIZE,
    LESION_TISSUES,
    MIMIC_IN_BONE_TISSUES,
    MIMIC_OUTSIDE_BONE_TISSUES,
    SIZES,
    SKELETON_CLASSES,
    Tissue,
)

log = logging.getLogger(__name__)

_STREAM_VOLUNTEER, _STREAM_HEALTHY_SCAN, _STREAM_PATIENT, _STREAM_PATIENT_SCAN = 0, 1, 2, 3
_STREAM_VOLUNTEER_SCANS, _STREAM_VOLUNTEER_MIMICS, _STREAM_PATIENT_MIMICS = 4, 5, 6
DEFAULT_MIMICS = 1.0
"""The mimics knob's default: the prevalences of docs/cohort.md."""
GENERATOR_VERSION = 1
"""Recorded in every phantom ``dataset.json``: raise it with any change that alters what a seed
draws, so that a study or ``sap headroom`` refuses (or regenerates) a cohort an older generator
wrote instead of reporting it as the current cohort's draw."""

# --------------------------------------------------------------------------------------------
# Cases and the cohort
# --------------------------------------------------------------------------------------------


@dataclass
class PhantomCase:
    """One rendered scan with its ground truth and the anatomy maps behind it.

    ``maps.tissue`` is the final tissue map (metastases and mimics included), ``mimic_ids``
    numbers the placed ``mimics`` as ``lesion_ids`` numbers the ``lesions``; ``site`` is the
    scanner site (``sites.SITES``).
    """

    case_id: str
    subject_id: str
    t1: np.ndarray
    b1000: np.ndarray
    maps: AnatomyMaps
    lesion_ids: np.ndarray
    lesions: list[Lesion]
    anatomy: SubjectAnatomy
    pose: ScanPose
    mimic_ids: np.ndarray
    mimics: list[Mimic]
    site: int = 0

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
    plan: Sequence[PlannedMimic] = (),
    site: int = 0,
) -> PhantomCase:
    """One scan of ``anatomy``: pose, anatomy maps, metastases (patients only), the person's
    planned mimics, and the images as acquired at ``site``.

    The mimics come last and draw nothing from ``rng``, so pose, metastases and noise do not
    depend on them: a case is the same at every mimic density except for its mimics.
    """
    pose = sample_scan_pose(rng, anatomy)
    maps = render_anatomy(anatomy, pose, shape, spacing)
    check_skeleton_map(case_id, maps.skeleton, shape, spacing)
    base_tissue = maps.tissue.copy()
    if with_lesions:
        volumes = sample_lesion_volumes_ml(rng, sample_lesion_count(rng))
        ids, lesions = place_lesions(rng, maps, spacing, volumes)
        if not lesions:
            raise DatasetError(
                f"phantom case {case_id}: no metastasis fits the bone of a {tuple(shape)} grid "
                f"at {tuple(spacing)} mm; use a finer --spacing or a preset --size"
            )
    else:
        ids, lesions = np.zeros(maps.tissue.shape, np.int16), []
    mimic_ids, mimics = place_mimics(plan, maps, ids, anatomy, pose, spacing)
    t1, b1000 = render_images(
        rng, anatomy, maps, base_tissue, ids, lesions, mimic_ids, mimics, spacing, SITES[site]
    )
    return PhantomCase(
        case_id, subject_id, t1, b1000, maps, ids, lesions, anatomy, pose, mimic_ids, mimics, site
    )


def generate_healthy_case(
    seed: int,
    index: int,
    shape: Sequence[int],
    spacing: Sequence[float],
    mimics: float = DEFAULT_MIMICS,
) -> PhantomCase:
    """Healthy scan ``index`` (``healthy_XXX``) of volunteer ``volunteer_YY``, at the
    volunteer's site, with the volunteer's mimics (the same in each of their scans)."""
    volunteer, _ = volunteer_of_scan(seed, index)
    anatomy = volunteer_anatomy(seed, volunteer, fov_of(shape, spacing))
    plan = plan_mimics([seed, _STREAM_VOLUNTEER_MIMICS, volunteer], "healthy", mimics)
    rng = np.random.default_rng([seed, _STREAM_HEALTHY_SCAN, index])
    case_id, subject_id = f"healthy_{index:03d}", f"volunteer_{volunteer:02d}"
    site = volunteer_site(volunteer)
    return render_case(case_id, subject_id, anatomy, rng, shape, spacing, False, plan, site)


def generate_patient_case(
    seed: int,
    index: int,
    shape: Sequence[int],
    spacing: Sequence[float],
    mimics: float = DEFAULT_MIMICS,
) -> PhantomCase:
    """Patient ``index`` (``patient_XXX``, one scan, subject = case) with at least one
    metastasis, scanned at the patients' site."""
    anatomy = patient_anatomy(seed, index, fov_of(shape, spacing))
    plan = plan_mimics([seed, _STREAM_PATIENT_MIMICS, index], "patients", mimics)
    rng = np.random.default_rng([seed, _STREAM_PATIENT_SCAN, index])
    case_id = f"patient_{index:03d}"
    return render_case(case_id, case_id, anatomy, rng, shape, spacing, True, plan, PATIENT_SITE)


@dataclass(frozen=True)
class CohortPaths:
    """The two datasets a cohort is written as."""

    root: Path
    skeleton: Path
    lesion: Path

    @classmethod
    def of(cls, out: str | os.PathLike) -> CohortPaths:
        root = Path(out)
        return cls(root, root / "skeleton", root / "lesion")


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


TISSUES_DIR = "tissuesTr"
"""Folder of each dataset holding every case's tissue map (``<case>.nii.gz``, uint8)."""
TISSUES_JSON = "tissues.json"
"""File beside the tissue maps naming each value and grouping them (bone, metastasis, mimics)."""


def tissue_path(root: str | os.PathLike, case_id: str) -> Path:
    """Where case ``case_id``'s tissue map lives in dataset ``root``."""
    return Path(root) / TISSUES_DIR / f"{case_id}{layout.FILE_ENDING}"


def tissue_legend() -> dict:
    """The content of ``tissues.json``: the name of every tissue value and its groups."""
    return {
        "values": {str(int(t)): t.name.lower() for t in Tissue},
        "bone": sorted(int(t) for t in BONE_TISSUES),
        "metastasis": sorted(int(t) for t in LESION_TISSUES),
        "mimics": {kind.name: int(kind.tissue) for kind in MIMIC_KINDS},
        "mimics_in_bone": sorted(int(t) for t in MIMIC_IN_BONE_TISSUES),
        "mimics_outside_bone": sorted(int(t) for t in MIMIC_OUTSIDE_BONE_TISSUES),
        "note": "docs/cohort.md; tissue maps are for analysis, never a network input",
    }


def _write_case(case: PhantomCase, root: Path, affine: np.ndarray, task: str) -> None:
    layout.save_nifti(layout.image_path(root, case.case_id, 0), case.t1, affine)
    layout.save_nifti(layout.image_path(root, case.case_id, 1), case.b1000, affine)
    if task == "skeleton":
        layout.save_nifti(layout.label_path(root, case.case_id), case.skeleton, affine)
    else:
        layout.save_nifti(layout.label_path(root, case.case_id), case.lesion_mask, affine)
        layout.save_nifti(layout.skeleton_reference_path(root, case.case_id), case.skeleton, affine)
    tissue = tissue_path(root, case.case_id)
    tissue.parent.mkdir(parents=True, exist_ok=True)
    layout.save_nifti(tissue, case.maps.tissue.astype(np.uint8), affine)


def _make_and_write(job: tuple[str, int, int, tuple, tuple, str, float]) -> dict:
    """Worker: generate one case and write its files; returns what dataset.json needs."""
    task, seed, index, shape, spacing, root, mimics = job
    generate = generate_healthy_case if task == "skeleton" else generate_patient_case
    case = generate(seed, index, shape, spacing, mimics)
    _write_case(case, Path(root), layout.affine_from_spacing(spacing), task)
    counts: dict[str, int] = {}
    for mimic in case.mimics:
        counts[mimic.kind] = counts.get(mimic.kind, 0) + 1
    return {
        "case": case.case_id,
        "subject": case.subject_id,
        "site": case.site,
        "mimics": counts,
        "lesion_volumes_ml": [round(les.volume_ml, 4) for les in case.lesions],
    }


def _dataset_json(task: str, records: list[dict], seed: int, shape, spacing, mimics: float) -> dict:
    labels = layout.SKELETON_LABELS if task == "skeleton" else layout.LESION_LABELS
    spec = {
        "name": f"phantom_{task}",
        "description": (
            "Synthetic whole-body MRI (sap_lightning.synthetic, docs/cohort.md): "
            + (
                "healthy volunteers, skeleton labels (ribs unlabelled)"
                if task == "skeleton"
                else "patients, bone-metastasis masks; skeletonTr holds the skeleton maps"
            )
            + f"; {TISSUES_DIR} holds the tissue maps ({TISSUES_JSON})"
        ),
        "channel_names": {str(i): name for i, name in enumerate(layout.CHANNEL_NAMES)},
        "labels": dict(labels),
        "numTraining": len(records),
        "file_ending": layout.FILE_ENDING,
        "subjects": {r["case"]: r["subject"] for r in records},
        "phantom": {
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "shape": list(shape),
            "spacing": list(spacing),
            "mimics": float(mimics),
            "sites": {r["case"]: r["site"] for r in records},
            "mimic_counts": {r["case"]: r["mimics"] for r in records},
        },
    }
    if task == "lesion":
        spec["phantom"]["lesion_volumes_ml"] = {r["case"]: r["lesion_volumes_ml"] for r in records}
    return spec


def cohort_differences(
    out: str | os.PathLike,
    n_healthy: int = DEFAULT_HEALTHY,
    n_patients: int = DEFAULT_PATIENTS,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    mimics: float = DEFAULT_MIMICS,
) -> list[tuple[str, object, object]] | None:
    """How the cohort in ``out`` differs from the one these settings draw with this generator:
    (setting, found, wanted) per difference (found None: not recorded, an older generator);
    an empty list when it is that cohort, None when ``out`` holds no cohort."""
    grid, vox = resolve_grid(shape=shape, spacing=spacing)
    files = [Path(out) / task / layout.DATASET_JSON for task in ("lesion", "skeleton")]
    if not all(path.is_file() for path in files):
        return None
    lesion, skeleton = (read_json(path) for path in files)
    made = lesion.get("phantom", {})
    settings = {
        "generator version": (made.get("generator_version"), GENERATOR_VERSION),
        "seed": (made.get("seed"), seed),
        "mimics": (made.get("mimics"), float(mimics)),
        "patients": (lesion.get("numTraining"), n_patients),
        "healthy scans": (skeleton.get("numTraining"), n_healthy),
        "shape": (made.get("shape"), list(grid)),
        "spacing": (made.get("spacing"), list(vox)),
    }
    return [(key, found, wanted) for key, (found, wanted) in settings.items() if found != wanted]


def ensure_phantom_cohort(
    out: str | os.PathLike,
    n_healthy: int = DEFAULT_HEALTHY,
    n_patients: int = DEFAULT_PATIENTS,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    workers: int = 1,
    mimics: float = DEFAULT_MIMICS,
) -> bool:
    """Reuse the cohort in ``out`` when it is the one these settings draw with this generator
    (:func:`cohort_differences`), else generate it, replacing another; True when reused."""
    settings = {"seed": seed, "shape": shape, "spacing": spacing, "mimics": mimics}
    if cohort_differences(out, n_healthy, n_patients, **settings) == []:
        return True
    make_phantom_cohort(out, n_healthy, n_patients, overwrite=True, workers=workers, **settings)
    return False


def make_phantom_cohort(
    out: str | os.PathLike,
    n_healthy: int = DEFAULT_HEALTHY,
    n_patients: int = DEFAULT_PATIENTS,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    overwrite: bool = False,
    workers: int = 1,
    mimics: float = DEFAULT_MIMICS,
) -> CohortPaths:
    """Write the synthetic cohort as ``out/skeleton`` (healthy) and ``out/lesion`` (patients).

    ``shape``/``spacing`` default to the ``small`` preset. ``mimics`` scales the prevalence of
    every mimic of docs/cohort.md (0 none, 1 the table, 2 twice); it is recorded in each
    ``dataset.json``, with every case's site and drawn mimics; ``tissuesTr/`` and
    ``tissues.json`` hold the tissue maps. Existing datasets at those two paths
    are replaced only with ``overwrite=True``; nothing else in ``out`` is touched. Each dataset
    is built in a temporary folder and renamed into place when complete, so an interrupted run
    never leaves a partial dataset (nor destroys the previous one).
    """
    grid, vox = resolve_grid(shape=shape, spacing=spacing)
    if not (math.isfinite(mimics) and mimics >= 0):
        raise ConfigError(f"mimics must be a finite number >= 0, got {mimics}")
    if n_healthy < 1 or n_patients < 1:
        raise ConfigError(
            f"need at least one healthy scan and one patient, got {n_healthy}, {n_patients}"
        )
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root}: exists and is not a folder")
    paths = CohortPaths.of(root)
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
            jobs = [(task, seed, i, grid, vox, str(tmp), float(mimics)) for i in range(count)]
            if workers > 1:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    records = list(pool.map(_make_and_write, jobs))
            else:
                records = [_make_and_write(job) for job in jobs]
            spec = _dataset_json(task, records, seed, grid, vox, mimics)
            write_json(tmp / layout.DATASET_JSON, spec)
            write_json(tmp / TISSUES_DIR / TISSUES_JSON, tissue_legend())
    log.info(
        "wrote %d healthy scans to %s and %d patients to %s",
        n_healthy,
        paths.skeleton,
        n_patients,
        paths.lesion,
    )
    return paths

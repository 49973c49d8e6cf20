"""Synthetic whole-body MRI cohort: healthy volunteers for skeleton pretraining, patients with
bone metastases for lesion fine-tuning.

No public WB-MRI metastasis dataset exists, so every command and test of the library runs on this
generator. What it draws is chosen so that the study keeps its meaning:

* two channels with plausible contrast: T1 (fat bright, marrow moderately bright, muscle
  intermediate, fluid and cortical bone dark) and DWI b1000 (fat suppressed, marrow dark,
  metastases, lymph nodes, kidneys, spleen, spinal cord and bladder bright);
* a skeleton whose bones have a cortical rim and marrow, labelled in the paper's 9 regions, with
  ribs (and skull, forearm and lower-leg bones) present in the image but unlabelled;
* metastases only inside bone (ribs included), with the paper's volume spread (log-normal,
  median 0.5 mL, a quarter >= 1 mL), never touching one another, so that 6-connected components
  are exactly the drawn lesions;
* b1000-bright *distractors* outside bone, so a model that ignores anatomy makes false positives;
* per-subject anatomy (height, build, proportions, spine curvature), per-scan pose, Rician noise
  and a smooth multiplicative bias field with WB-MRI station steps in the b1000 channel.

Geometry is written in an adult "design" space (mm of a 1750 mm tall man: ``x`` to the subject's
right, ``y`` anterior, ``zv`` downward from the vertex) and mapped by one affine into the field of
view, which it fills; the arrays follow the NIfTI RAS+ convention of
:func:`~sap_lightning.data.layout.affine_from_spacing` (axis 0 towards the subject's right,
axis 1 anterior, axis 2 towards the head). Rendering works on each structure's bounding box.

Everything is deterministic for a seed: each case draws from its own ``numpy`` generator derived
from ``(seed, stream, index)``, so case ``k`` is identical whatever the cohort size.

Modules, by concern: ``tissues`` (signals, sizes, lesion statistics), ``geometry`` (shapes),
``anatomy`` (subject and pose), ``frame`` (one body's coordinates, spine and landmarks),
``skeleton`` (the bones as shapes), ``body`` (soft tissues and the whole paint list),
``rasterize`` (shapes to voxel maps), ``lesions`` (metastases), ``images`` (T1 and b1000),
``cohort`` (cases and datasets). Modules talk through public names only.
"""

from __future__ import annotations

from sap_lightning.synthetic.anatomy import (
    ScanPose,
    SubjectAnatomy,
    design_to_world,
    make_subject_anatomy,
    sample_scan_pose,
)
from sap_lightning.synthetic.cohort import (
    CohortPaths,
    PhantomCase,
    check_skeleton_map,
    fov_of,
    generate_healthy_case,
    generate_patient_case,
    make_phantom_cohort,
    patient_anatomy,
    render_case,
    resolve_grid,
    volunteer_anatomy,
    volunteer_of_scan,
)
from sap_lightning.synthetic.frame import (
    BodyFrame,
    Paint,
)
from sap_lightning.synthetic.geometry import (
    Capsule,
    Cylinder,
    Ellipsoid,
    Shape,
    Swept,
    rotation,
)
from sap_lightning.synthetic.images import (
    render_images,
    smooth_noise,
)
from sap_lightning.synthetic.lesions import (
    Lesion,
    place_lesions,
    sample_lesion_count,
    sample_lesion_volumes_ml,
)
from sap_lightning.synthetic.rasterize import (
    AnatomyMaps,
    render_anatomy,
)
from sap_lightning.synthetic.tissues import (
    BONE_TISSUES,
    CHANNEL_SCALE,
    DEFAULT_HEALTHY,
    DEFAULT_PATIENTS,
    DEFAULT_SIZE,
    DISTRACTOR_TISSUES,
    LESION_B1000_RANGE,
    LESION_LOG_SIGMA,
    LESION_MAX_ML,
    LESION_MEDIAN_ML,
    LESION_SITE_WEIGHTS,
    LESION_T1_RANGE,
    MAX_LESIONS,
    MIN_LESION_VOXELS,
    OTHER_BONE_REGION,
    RIB_REGION,
    SIGNAL,
    SIZES,
    SKELETON_CLASSES,
    YELLOW_MARROW_SIGNAL,
    Tissue,
)

__all__ = [
    "BONE_TISSUES",
    "CHANNEL_SCALE",
    "DEFAULT_HEALTHY",
    "DEFAULT_PATIENTS",
    "DEFAULT_SIZE",
    "DISTRACTOR_TISSUES",
    "LESION_B1000_RANGE",
    "LESION_LOG_SIGMA",
    "LESION_MAX_ML",
    "LESION_MEDIAN_ML",
    "LESION_SITE_WEIGHTS",
    "LESION_T1_RANGE",
    "MAX_LESIONS",
    "MIN_LESION_VOXELS",
    "OTHER_BONE_REGION",
    "RIB_REGION",
    "SIGNAL",
    "SIZES",
    "SKELETON_CLASSES",
    "YELLOW_MARROW_SIGNAL",
    "AnatomyMaps",
    "BodyFrame",
    "Capsule",
    "CohortPaths",
    "Cylinder",
    "Ellipsoid",
    "Lesion",
    "Paint",
    "PhantomCase",
    "ScanPose",
    "Shape",
    "SubjectAnatomy",
    "Swept",
    "Tissue",
    "check_skeleton_map",
    "design_to_world",
    "fov_of",
    "generate_healthy_case",
    "generate_patient_case",
    "make_phantom_cohort",
    "make_subject_anatomy",
    "patient_anatomy",
    "place_lesions",
    "render_anatomy",
    "render_case",
    "render_images",
    "resolve_grid",
    "rotation",
    "sample_lesion_count",
    "sample_lesion_volumes_ml",
    "sample_scan_pose",
    "smooth_noise",
    "volunteer_anatomy",
    "volunteer_of_scan",
]

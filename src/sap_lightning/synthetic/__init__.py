"""Synthetic whole-body MRI cohort: healthy volunteers for skeleton pretraining, patients with
bone metastases for lesion fine-tuning. The specification is docs/cohort.md.

No public WB-MRI metastasis dataset exists, so every command and test of the library runs on this
generator. What it draws is chosen so that the study keeps its meaning:

* two channels with plausible contrast: T1 (fat bright, marrow moderately bright, muscle
  intermediate, fluid and cortical bone dark) and DWI b1000 (fat suppressed, muscle dark, red
  marrow grey, metastases from barely to clearly brighter than marrow, sclerotic ones dark);
* a skeleton whose bones have a cortical rim and marrow, labelled in the paper's 9 regions, with
  ribs (and skull, forearm and lower-leg bones) present in the image but unlabelled;
* metastases in bone (ribs included), with the paper's volume spread (log-normal, median 0.5 mL,
  a quarter >= 1 mL), a skewed count of at least one per patient, heterogeneity and soft edges,
  some growing into the soft tissue beside the bone, never touching one another, so that the
  6-connected components of the label are exactly the drawn lesions;
* **mimics** (``mimic_table``, ``mimics``), never labelled: inside bone (red-marrow islands,
  lipid-poor haemangiomas, Modic endplate bands, fractures, treated metastases, bone islands)
  and outside bone touching it (dorsal root ganglia, lymph nodes, nodal metastases, pelvic and
  head-and-neck organs, bowel), at the prevalences of the literature times the ``mimics`` knob;
* per-subject anatomy (height, build, proportions, spine curvature), per-scan pose, and three
  scanner sites (``sites``: gain, Rician noise, bias field and station steps) for the healthy
  volunteers, one of them for the patients;
* a tissue map per case (``tissuesTr``), for analysis (``sap headroom``), never a network input.

Geometry is written in an adult "design" space (mm of a 1750 mm tall man: ``x`` to the subject's
right, ``y`` anterior, ``zv`` downward from the vertex) and mapped by one affine into the field of
view, which it fills; the arrays follow the NIfTI RAS+ convention of
:func:`~sap_lightning.data.layout.affine_from_spacing` (axis 0 towards the subject's right,
axis 1 anterior, axis 2 towards the head). Rendering works on each structure's bounding box.

Everything is deterministic for a seed: each case draws from its own ``numpy`` generator derived
from ``(seed, stream, index)``, so case ``k`` is identical whatever the cohort size; mimics draw
from their own streams after the metastases, so a case is the same at every mimic density
except for its mimics.

Modules, by concern: ``tissues`` (signals, sizes, lesion statistics), ``geometry`` (shapes),
``anatomy`` (subject and pose), ``frame`` (one body's coordinates, spine and landmarks),
``skeleton`` (the bones as shapes), ``body`` (soft tissues and the whole paint list),
``rasterize`` (shapes to voxel maps), ``lesions`` (metastases), ``mimic_table`` (the mimics as
data), ``landmarks`` (where they go), ``mimics`` (planning and placing them), ``sites``
(scanners), ``images`` (T1 and b1000), ``cohort`` (cases and datasets). Modules talk through
public names only.
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
    DEFAULT_MIMICS,
    GENERATOR_VERSION,
    TISSUES_DIR,
    TISSUES_JSON,
    CohortPaths,
    PhantomCase,
    check_skeleton_map,
    cohort_differences,
    ensure_phantom_cohort,
    fov_of,
    generate_healthy_case,
    generate_patient_case,
    make_phantom_cohort,
    patient_anatomy,
    render_case,
    resolve_grid,
    tissue_legend,
    tissue_path,
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
    grow_blob,
    place_lesions,
    sample_lesion_count,
    sample_lesion_look,
    sample_lesion_volumes_ml,
)
from sap_lightning.synthetic.mimic_table import (
    MIMIC_BY_NAME,
    MIMIC_KINDS,
    MimicKind,
)
from sap_lightning.synthetic.mimics import (
    Mimic,
    PlannedMimic,
    place_mimics,
    plan_mimics,
    sample_count,
)
from sap_lightning.synthetic.rasterize import (
    AnatomyMaps,
    VoxelGrid,
    render_anatomy,
)
from sap_lightning.synthetic.sites import (
    PATIENT_SITE,
    SITES,
    Site,
    volunteer_site,
)
from sap_lightning.synthetic.tissues import (
    BONE_TISSUES,
    CHANNEL_SCALE,
    DEFAULT_HEALTHY,
    DEFAULT_PATIENTS,
    DEFAULT_SIZE,
    DISTRACTOR_TISSUES,
    LESION_B1000_RATIO,
    LESION_LOG_SIGMA,
    LESION_MAX_ML,
    LESION_MEDIAN_ML,
    LESION_SITE_WEIGHTS,
    LESION_T1_RANGE,
    LESION_TISSUES,
    MIMIC_IN_BONE_TISSUES,
    MIMIC_OUTSIDE_BONE_TISSUES,
    MIMIC_TISSUES,
    MIN_LESION_VOXELS,
    OTHER_BONE_REGION,
    RED_MARROW_B1000,
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
    "DEFAULT_MIMICS",
    "DEFAULT_PATIENTS",
    "DEFAULT_SIZE",
    "DISTRACTOR_TISSUES",
    "GENERATOR_VERSION",
    "LESION_B1000_RATIO",
    "LESION_LOG_SIGMA",
    "LESION_MAX_ML",
    "LESION_MEDIAN_ML",
    "LESION_SITE_WEIGHTS",
    "LESION_T1_RANGE",
    "LESION_TISSUES",
    "MIMIC_BY_NAME",
    "MIMIC_IN_BONE_TISSUES",
    "MIMIC_KINDS",
    "MIMIC_OUTSIDE_BONE_TISSUES",
    "MIMIC_TISSUES",
    "MIN_LESION_VOXELS",
    "OTHER_BONE_REGION",
    "PATIENT_SITE",
    "RED_MARROW_B1000",
    "RIB_REGION",
    "SIGNAL",
    "SITES",
    "SIZES",
    "SKELETON_CLASSES",
    "TISSUES_DIR",
    "TISSUES_JSON",
    "YELLOW_MARROW_SIGNAL",
    "AnatomyMaps",
    "BodyFrame",
    "Capsule",
    "CohortPaths",
    "Cylinder",
    "Ellipsoid",
    "Lesion",
    "Mimic",
    "MimicKind",
    "Paint",
    "PhantomCase",
    "PlannedMimic",
    "ScanPose",
    "Shape",
    "Site",
    "SubjectAnatomy",
    "Swept",
    "Tissue",
    "VoxelGrid",
    "check_skeleton_map",
    "cohort_differences",
    "design_to_world",
    "ensure_phantom_cohort",
    "fov_of",
    "generate_healthy_case",
    "generate_patient_case",
    "grow_blob",
    "make_phantom_cohort",
    "make_subject_anatomy",
    "patient_anatomy",
    "place_lesions",
    "place_mimics",
    "plan_mimics",
    "render_anatomy",
    "render_case",
    "render_images",
    "resolve_grid",
    "rotation",
    "sample_count",
    "sample_lesion_count",
    "sample_lesion_look",
    "sample_lesion_volumes_ml",
    "sample_scan_pose",
    "smooth_noise",
    "tissue_legend",
    "tissue_path",
    "volunteer_anatomy",
    "volunteer_of_scan",
    "volunteer_site",
]

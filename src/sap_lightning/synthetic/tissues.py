"""Tissues, their signal in each channel, cohort sizes and lesion statistics."""

from __future__ import annotations

import logging
import math
from enum import IntEnum

from sap_lightning.dataset import layout

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Public constants
# --------------------------------------------------------------------------------------------

SIZES: dict[str, tuple[tuple[int, int, int], tuple[float, float, float]]] = {
    "tiny": ((64, 64, 128), (4.5, 4.5, 9.0)),
    "small": ((96, 96, 192), (3.0, 3.0, 6.0)),
    "medium": ((128, 128, 256), (2.25, 2.25, 4.5)),
    "large": ((192, 192, 384), (1.5, 1.5, 3.0)),
}
"""Grid presets (shape, spacing in mm), all covering the same 288 x 288 x 1152 mm field of view,
so a seed gives the same bodies at every resolution. Shapes are multiples of 32 (Swin UNETR)."""

DEFAULT_SIZE = "small"
DEFAULT_HEALTHY = 10
DEFAULT_PATIENTS = 14

RIB_REGION = 10
"""Bone-region code of the ribs: bone in the image, label 0 in the skeleton map (as in the paper)."""
OTHER_BONE_REGION = 11
"""Bone-region code of skull, forearm, lower-leg and foot bones: bone, unlabelled."""

SKELETON_CLASSES: dict[str, int] = {k: v for k, v in layout.SKELETON_LABELS.items() if v > 0}

MIN_LESION_VOXELS = 3
"""Smaller lesions are drawn at this size: a 1-2 voxel blob is not a resolvable lesion."""
LESION_MEDIAN_ML = 0.5
LESION_LOG_SIGMA = math.log(2.0) / 0.6745
"""Log-normal spread giving P(volume >= 1 mL) = 0.25 around a 0.5 mL median (docs/method.md)."""
LESION_MAX_ML = 10.0
LESION_COUNT_SHAPE = 0.8
LESION_COUNT_EXTRA_MEAN = 5.0
"""Lesions per patient: 1 + negative binomial (shape 0.8, mean 5): at least one, median about
4, one patient in ten with 14 or more, no upper limit (docs/cohort.md, assumption)."""
SCLEROTIC_SHARE = 0.2
"""Share of metastases that are sclerotic: very dark on T1, dark to iso on b1000."""
EXTENSION_SHARE = 0.15
"""Share of metastases of >= 1 mL that grow through the cortex into the soft tissue next to it."""
EXTENSION_FRACTION = (0.2, 0.6)
"""Volume of such an extension, as a fraction of the lesion's volume in bone."""
LESION_TEXTURE = (0.10, 0.35)
"""Per-lesion amplitude h of the internal heterogeneity: signal x (1 + h x smooth field)."""
LESION_EDGE = (0.5, 0.8)
"""Share of its contrast a lesion's boundary voxel keeps against the tissue it replaced."""


class Tissue(IntEnum):
    """Tissue classes of the anatomy map; each has a (T1, b1000) signal in :data:`SIGNAL`.

    Values 0-20 are anatomy and metastases; 21 and up are the mimics of docs/cohort.md, whose
    signal is drawn per instance (``mimic_table``).
    """

    AIR = 0
    FAT = 1
    MUSCLE = 2
    LUNG = 3
    HEART = 4
    VESSEL = 5
    LIVER = 6
    SPLEEN = 7
    KIDNEY = 8
    BLADDER = 9
    BOWEL = 10
    BRAIN = 11
    CSF = 12
    CORD = 13
    DISC = 14
    LYMPH_NODE = 15
    BONE = 16  # while drawing; split into CORTEX and MARROW once the skeleton is complete
    CORTEX = 17
    MARROW = 18
    LESION = 19  # a metastasis inside bone
    LESION_EXTENSION = 20  # a metastasis's growth through the cortex into soft tissue
    DORSAL_ROOT_GANGLION = 21
    NODAL_METASTASIS = 22
    PROSTATE = 23
    SEMINAL_VESICLE = 24
    TESTIS = 25
    PAROTID = 26
    SUBMANDIBULAR = 27
    TONSIL = 28
    BRIGHT_BOWEL = 29
    RED_MARROW_ISLAND = 30
    MARROW_RECONVERSION = 31
    HAEMANGIOMA = 32
    MODIC = 33
    FRACTURE = 34
    TREATED_METASTASIS = 35
    BONE_ISLAND = 36


SIGNAL: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (0.0, 0.0),
    Tissue.FAT: (0.95, 0.03),
    Tissue.MUSCLE: (0.32, 0.05),
    Tissue.LUNG: (0.04, 0.02),
    Tissue.HEART: (0.30, 0.04),
    Tissue.VESSEL: (0.22, 0.03),
    Tissue.LIVER: (0.45, 0.09),
    Tissue.SPLEEN: (0.38, 0.55),
    Tissue.KIDNEY: (0.33, 0.30),
    Tissue.BLADDER: (0.08, 0.12),
    Tissue.BOWEL: (0.45, 0.28),
    Tissue.BRAIN: (0.50, 0.45),
    Tissue.CSF: (0.10, 0.06),
    Tissue.CORD: (0.40, 0.25),
    Tissue.DISC: (0.34, 0.12),
    Tissue.BONE: (0.65, 0.11),
    Tissue.CORTEX: (0.25, 0.04),  # rim voxel: thin cortical bone partial-volumed with marrow
    Tissue.MARROW: (0.65, 0.11),
}
"""Noise-free signal of the anatomy (fractions of the channel's scanner scale; docs/cohort.md
section 1.4). Marrow is red (haematopoietic) in the axial skeleton; :data:`YELLOW_MARROW_SIGNAL`
replaces it in long bones. Metastases and mimics get their signal per instance."""

RED_MARROW_B1000 = SIGNAL[Tissue.MARROW][1]
"""The b1000 level that metastases' and in-bone mimics' contrasts are multiples of."""
YELLOW_MARROW_SIGNAL = (0.85, 0.04)
YELLOW_MARROW_REGIONS = (SKELETON_CLASSES["femurs"], SKELETON_CLASSES["humeri"], OTHER_BONE_REGION)
LESION_T1_RANGE = (0.12, 0.32)
"""T1 of a viable metastasis: darker than muscle (0.32) and disc (0.34)."""
LESION_B1000_RATIO = (1.2, 4.0)
"""b1000 of a viable metastasis in multiples of red marrow (log-uniform)."""
SCLEROTIC_T1_RANGE = (0.04, 0.12)
SCLEROTIC_B1000_RATIO = (0.6, 1.2)
"""A sclerotic metastasis: very dark on T1, dark to iso on b1000 (uniform multiples of marrow)."""
CHANNEL_SCALE = (1000.0, 400.0)
"""Scanner units of T1 and b1000: intensities are not in [0, 1], as on real scans."""

LESION_TISSUES = (Tissue.LESION, Tissue.LESION_EXTENSION)
"""The metastasis: its part in bone and its extension into soft tissue (both labelled)."""
MIMIC_IN_BONE_TISSUES = (
    Tissue.RED_MARROW_ISLAND,
    Tissue.MARROW_RECONVERSION,
    Tissue.HAEMANGIOMA,
    Tissue.MODIC,
    Tissue.FRACTURE,
    Tissue.TREATED_METASTASIS,
    Tissue.BONE_ISLAND,
)
MIMIC_OUTSIDE_BONE_TISSUES = (
    Tissue.DORSAL_ROOT_GANGLION,
    Tissue.LYMPH_NODE,
    Tissue.NODAL_METASTASIS,
    Tissue.PROSTATE,
    Tissue.SEMINAL_VESICLE,
    Tissue.TESTIS,
    Tissue.PAROTID,
    Tissue.SUBMANDIBULAR,
    Tissue.TONSIL,
    Tissue.BRIGHT_BOWEL,
)
MIMIC_TISSUES = MIMIC_IN_BONE_TISSUES + MIMIC_OUTSIDE_BONE_TISSUES
BONE_TISSUES = (Tissue.BONE, Tissue.CORTEX, Tissue.MARROW, Tissue.LESION, *MIMIC_IN_BONE_TISSUES)
"""Every tissue that is bone (has a bone region): a metastasis's extension is not."""
DISTRACTOR_TISSUES = (Tissue.SPLEEN, Tissue.KIDNEY, Tissue.CORD, Tissue.BRAIN)
"""Anatomy bright on b1000 outside bone, drawn in everyone whatever the mimics knob."""
SOFT_TISSUES = (Tissue.FAT, Tissue.MUSCLE, Tissue.BOWEL)
"""Soft tissue that nodes, organs and a metastasis's extension may be drawn over."""

LESION_SITE_WEIGHTS: dict[int, float] = {
    SKELETON_CLASSES["cervical_spine"]: 0.05,
    SKELETON_CLASSES["thoracic_spine"]: 0.20,
    SKELETON_CLASSES["lumbar_spine"]: 0.16,
    SKELETON_CLASSES["pelvis"]: 0.24,
    SKELETON_CLASSES["femurs"]: 0.09,
    SKELETON_CLASSES["humeri"]: 0.04,
    SKELETON_CLASSES["scapulae"]: 0.04,
    SKELETON_CLASSES["clavicles"]: 0.02,
    SKELETON_CLASSES["sternum"]: 0.04,
    RIB_REGION: 0.12,
}
"""Where metastases are seeded (bone region -> probability): the red-marrow skeleton, where
prostate-cancer metastases occur; skull and distal limb bones get none."""

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
MAX_LESIONS = 12


class Tissue(IntEnum):
    """Tissue classes of the anatomy map; each has a (T1, b1000) signal in :data:`SIGNAL`."""

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
    LESION = 19


SIGNAL: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (0.0, 0.0),
    Tissue.FAT: (0.95, 0.03),
    Tissue.MUSCLE: (0.32, 0.10),
    Tissue.LUNG: (0.04, 0.02),
    Tissue.HEART: (0.30, 0.05),
    Tissue.VESSEL: (0.22, 0.03),
    Tissue.LIVER: (0.45, 0.14),
    Tissue.SPLEEN: (0.38, 0.42),
    Tissue.KIDNEY: (0.33, 0.55),
    Tissue.BLADDER: (0.08, 0.60),
    Tissue.BOWEL: (0.45, 0.16),
    Tissue.BRAIN: (0.50, 0.32),
    Tissue.CSF: (0.10, 0.08),
    Tissue.CORD: (0.40, 0.55),
    Tissue.DISC: (0.34, 0.18),
    Tissue.LYMPH_NODE: (0.33, 0.75),
    Tissue.BONE: (0.65, 0.10),
    Tissue.CORTEX: (0.25, 0.05),  # rim voxel: thin cortical bone partial-volumed with marrow
    Tissue.MARROW: (0.65, 0.10),
    Tissue.LESION: (0.22, 0.70),
}
"""Noise-free signal per tissue (fractions of the channel's scanner scale). Marrow is red
(haematopoietic) in the axial skeleton; :data:`YELLOW_MARROW_SIGNAL` replaces it in long bones."""

YELLOW_MARROW_SIGNAL = (0.85, 0.05)
YELLOW_MARROW_REGIONS = (SKELETON_CLASSES["femurs"], SKELETON_CLASSES["humeri"], OTHER_BONE_REGION)
LESION_T1_RANGE = (0.12, 0.32)
LESION_B1000_RANGE = (0.45, 0.95)
CHANNEL_SCALE = (1000.0, 400.0)
"""Scanner units of T1 and b1000: intensities are not in [0, 1], as on real scans."""

BONE_TISSUES = (Tissue.BONE, Tissue.CORTEX, Tissue.MARROW, Tissue.LESION)
DISTRACTOR_TISSUES = (Tissue.BLADDER, Tissue.KIDNEY, Tissue.CORD, Tissue.LYMPH_NODE, Tissue.SPLEEN)
"""Soft tissues that are bright on b1000 like a metastasis but lie outside bone."""
SOFT_TISSUES = (Tissue.FAT, Tissue.MUSCLE, Tissue.BOWEL)

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

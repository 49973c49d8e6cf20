"""The mimics of docs/cohort.md (sections 1.2 and 1.3) as data: where, how large, how bright,
how often.

Every number here is a row of that page's tables (a test compares them); the page says which
come from a source and which are assumptions. :mod:`~sap_lightning.synthetic.mimics` draws and
places them. Signals are fractions of the channel scale; b1000 of in-bone mimics is given as a
multiple of red marrow (:data:`RED_MARROW_B1000`), as on the page. Volumes are world mL.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

from sap_lightning.synthetic.frame import VERTEBRA_NAMES
from sap_lightning.synthetic.tissues import (
    LESION_SITE_WEIGHTS,
    RED_MARROW_B1000,
    RIB_REGION,
    SKELETON_CLASSES,
    Tissue,
)

log = logging.getLogger(__name__)

COHORTS = ("healthy", "patients")


@dataclass(frozen=True)
class MimicKind:
    """One row of the mimic tables.

    ``expected`` is the expected count per scan at ``mimics=1`` for healthy volunteers and
    patients; for an ``organ`` it is the probability the organ (one instance per ``side``) is
    present. ``placement`` names how it is drawn: ``bone_blob`` (grown in marrow from a bone
    landmark), ``band`` (an endplate or fracture band), ``soft_blob`` (grown in soft tissue from
    a landmark, ``touching`` the share seeded against bone), ``organ`` (an ellipsoid at its
    anatomical place) or ``bowel`` (grown inside bowel). ``sites`` weights the landmarks.
    """

    name: str
    tissue: Tissue
    in_bone: bool
    placement: str
    expected: tuple[float, float]
    t1: tuple[float, float]
    b1000: tuple[float, float]
    sites: dict[str, float] = field(default_factory=dict)
    volume_ml: tuple[float, float] | None = None
    touching: float = 0.0
    cap: int | None = None
    sides: tuple[int, ...] = (0,)

    @property
    def organ(self) -> bool:
        return self.placement == "organ"


def _x_marrow(low: float, high: float) -> tuple[float, float]:
    """A b1000 range given as multiples of red marrow (the page's "x marrow")."""
    return (low * RED_MARROW_B1000, high * RED_MARROW_B1000)


# ---------------------------------------------------------------------------- sizes and sites

DRG_LEVELS: tuple[str, ...] = (
    *(f"{a}/{b}" for a, b in itertools.pairwise(VERTEBRA_NAMES)),
    "L5/S1",
)
"""The 24 foramen levels C1/2 ... L5/S1 (each with a left and a right foramen)."""


def drg_volume_ml(level: int) -> float:
    """Volume (mL) of the ganglion in foramen ``level`` (0 = C1/C2 ... 23 = L5/S1)."""
    name = DRG_LEVELS[level]
    upper = name.split("/")[0]
    if upper in ("C1", "C2", "C3", "C4"):
        return 0.05
    if upper in ("C5", "C6", "C7", "T1"):
        return 0.12
    if upper.startswith("T"):
        return 0.06
    return {"L1": 0.15, "L2": 0.15, "L3": 0.15, "L4": 0.21, "L5": 0.29}[upper]


DRG_FORAMINA = 2 * len(DRG_LEVELS)

HAEMANGIOMA_LEVELS: dict[str, float] = {
    **{f"C{i}": 0.01 for i in range(1, 8)},
    **{f"T{i}": 0.07 for i in range(1, 13)},
    "L1": 0.20,
    **{f"L{i}": 0.10 for i in range(2, 6)},
}
"""Weight per vertebra of a haemangioma (L1 most affected)."""

MODIC_LEVELS: dict[str, float] = {
    "L1/L2": 0.085,
    "L2/L3": 0.085,
    "L3/L4": 0.085,
    "L4/L5": 0.3725,
    "L5/S1": 0.3725,
}
MODIC_PAIRED = 0.78
"""Probability that a Modic change involves both endplates of its disc."""
MODIC_THICKNESS_MM = (3.0, 8.0)
MODIC_COVERAGE = (0.6, 1.0)
FRACTURE_THICKNESS_MM = (5.0, 10.0)
FRACTURE_VERTEBRAE = ("T10", "T11", "T12", "L1", "L2")
NODE_SHORT_AXIS_MM = (3.0, 6.0)
NODE_ELONGATION = (1.2, 2.0)
NODAL_METASTASIS_SHORT_AXIS_MM = (8.0, 15.0)
NODAL_METASTASIS_ELONGATION = (1.0, 1.5)

_LANDMARK_GROUP_OF_REGION: dict[str, str] = {
    "cervical_spine": "cervical",
    "thoracic_spine": "thoracic",
    "lumbar_spine": "lumbar",
    "pelvis": "pelvis",
    "femurs": "femur",
    "humeri": "humerus",
    "scapulae": "scapula",
    "clavicles": "clavicle",
    "sternum": "sternum",
}
LESION_SITES: dict[str, float] = {
    **{
        group: LESION_SITE_WEIGHTS[SKELETON_CLASSES[region]]
        for region, group in _LANDMARK_GROUP_OF_REGION.items()
    },
    "ribs": LESION_SITE_WEIGHTS[RIB_REGION],
}
"""The metastases' site weights (``tissues.LESION_SITE_WEIGHTS``) as landmark groups."""


def ellipsoid_ml(short_mm: float, long_mm: float) -> float:
    """Volume (mL) of an ellipsoid with two short axes and one long axis (diameters, mm)."""
    return math.pi / 6.0 * short_mm * short_mm * long_mm / 1000.0


# ---------------------------------------------------------------------------- the table

MIMIC_KINDS: tuple[MimicKind, ...] = (
    # Outside bone: organs first (they are large and are drawn before the smaller structures).
    MimicKind(
        "prostate", Tissue.PROSTATE, False, "organ", (1.0, 1.0), (0.28, 0.34), (0.18, 0.28),
        volume_ml=(20.0, 60.0),
    ),
    MimicKind(
        "seminal_vesicle", Tissue.SEMINAL_VESICLE, False, "organ", (1.0, 1.0), (0.12, 0.20),
        (0.08, 0.15), volume_ml=(3.0, 8.0), sides=(1, -1),
    ),
    MimicKind(
        "testis", Tissue.TESTIS, False, "organ", (1.0, 1.0), (0.28, 0.34), (0.40, 0.55),
        volume_ml=(12.0, 20.0), sides=(1, -1),
    ),
    MimicKind(
        "parotid", Tissue.PAROTID, False, "organ", (1.0, 1.0), (0.55, 0.70), (0.20, 0.30),
        volume_ml=(15.0, 30.0), sides=(1, -1),
    ),
    MimicKind(
        "submandibular", Tissue.SUBMANDIBULAR, False, "organ", (1.0, 1.0), (0.38, 0.45),
        (0.25, 0.35), volume_ml=(6.0, 10.0), sides=(1, -1),
    ),
    MimicKind(
        "tonsil", Tissue.TONSIL, False, "organ", (1.0, 1.0), (0.30, 0.36), (0.35, 0.50),
        volume_ml=(1.0, 4.0), sides=(1, -1),
    ),
    # Inside bone.
    MimicKind(
        "red_marrow_island", Tissue.RED_MARROW_ISLAND, True, "bone_blob", (0.1, 0.1),
        (0.30, 0.45), _x_marrow(1.5, 2.5),
        sites={"pelvis": 0.40, "femur_proximal": 0.20, "lumbar": 0.15, "thoracic": 0.15,
               "humerus_proximal": 0.10},
        volume_ml=(0.3, 2.0),
    ),
    MimicKind(
        "marrow_reconversion", Tissue.MARROW_RECONVERSION, True, "bone_blob", (0.0, 1.0),
        (0.30, 0.45), _x_marrow(1.3, 2.2),
        sites={"pelvis": 0.35, "lumbar": 0.25, "thoracic": 0.20, "femur_proximal": 0.20},
        volume_ml=(0.5, 3.0),
    ),
    MimicKind(
        "haemangioma", Tissue.HAEMANGIOMA, True, "bone_blob", (0.11, 0.11), (0.30, 0.45),
        _x_marrow(1.5, 3.0), sites={f"vertebra:{k}": w for k, w in HAEMANGIOMA_LEVELS.items()},
        volume_ml=(0.3, 3.0),
    ),
    MimicKind(
        "modic_type1", Tissue.MODIC, True, "band", (0.28, 0.28), (0.18, 0.30),
        _x_marrow(1.2, 2.0), sites={f"disc:{k}": w for k, w in MODIC_LEVELS.items()},
    ),
    MimicKind(
        "fracture", Tissue.FRACTURE, True, "band", (0.05, 0.2), (0.15, 0.28),
        _x_marrow(1.5, 3.0), sites={"vertebral": 0.7, "sacral": 0.3},
    ),
    MimicKind(
        "treated_metastasis", Tissue.TREATED_METASTASIS, True, "bone_blob", (0.0, 1.0),
        (0.04, 0.12), _x_marrow(0.4, 1.0), sites=LESION_SITES,
    ),
    MimicKind(
        "bone_island", Tissue.BONE_ISLAND, True, "bone_blob", (0.3, 0.3), (0.02, 0.08),
        _x_marrow(0.2, 0.6),
        sites={"pelvis": 0.35, "femur": 0.25, "lumbar": 0.10, "thoracic": 0.10, "ribs": 0.10,
               "humerus": 0.10},
        volume_ml=(0.02, 0.5),
    ),
    # Outside bone, touching it or allowed to.
    MimicKind(
        "dorsal_root_ganglion", Tissue.DORSAL_ROOT_GANGLION, False, "soft_blob", (20.0, 20.0),
        (0.28, 0.36), (0.30, 0.45), touching=1.0, cap=DRG_FORAMINA,
    ),
    MimicKind(
        "nodal_metastasis", Tissue.NODAL_METASTASIS, False, "soft_blob", (0.0, 0.8),
        (0.26, 0.34), (0.30, 0.50),
        sites={"presacral": 0.3, "pelvic_side_wall": 0.4, "para_aortic": 0.3}, touching=0.5,
    ),
    MimicKind(
        "lymph_node", Tissue.LYMPH_NODE, False, "soft_blob", (53.0, 53.0), (0.30, 0.36),
        (0.35, 0.50),
        sites={"neck": 0.30, "supraclavicular": 0.05, "axilla": 0.18, "mediastinum": 0.03,
               "para_aortic": 0.08, "common_iliac": 0.05, "pelvic_side_wall": 0.10,
               "presacral": 0.02, "inguinal": 0.19},
    ),
    MimicKind(
        "bright_bowel", Tissue.BRIGHT_BOWEL, False, "bowel", (2.0, 2.0), (0.30, 0.45),
        (0.35, 0.55), volume_ml=(2.0, 10.0),
    ),
)  # fmt: skip
"""Every mimic kind, in drawing order (docs/cohort.md sections 1.2 and 1.3)."""

MIMIC_BY_NAME: dict[str, MimicKind] = {kind.name: kind for kind in MIMIC_KINDS}

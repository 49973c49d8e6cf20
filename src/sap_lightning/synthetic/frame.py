"""One body's frame: design coordinates, the spine's course, landmarks, and the paint list.

Every part of the body (``skeleton``, ``body``) and every mimic drawn around the skeleton
(``mimics``) places itself through a :class:`BodyFrame`, so they agree on where a vertebra, a
foramen or a hip is for this subject and pose. All numbers are design mm (see the package
docstring): ``x`` to the subject's right, ``y`` anterior, ``zv`` down from the vertex.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sap_lightning.synthetic.anatomy import ARM_LENGTHS, ScanPose, SubjectAnatomy
from sap_lightning.synthetic.geometry import Capsule, Shape, Swept
from sap_lightning.synthetic.tissues import SKELETON_CLASSES, Tissue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paint:
    """One drawing step: fill ``shape`` with ``tissue`` and bone ``region`` (0 = not bone).

    ``over`` restricts the fill to voxels currently holding one of those tissues.
    """

    shape: Shape
    tissue: Tissue
    region: int = 0
    over: tuple[Tissue, ...] | None = None


@dataclass(frozen=True)
class Vertebra:
    """One vertebra of the stack (design mm): region label, centre height, body and canal."""

    region: int
    z: float  # centre, design zv
    half_height: float
    radii: tuple[float, float]
    canal: tuple[float, float]
    cord: tuple[float, float] | None  # radii of the spinal cord, None below the conus (L1)
    spinous: tuple[float, float]  # length, downward angle (degrees)
    transverse: float
    disc_below: float


# (region, count, body height first/last, disc, body radii x first/last, y first/last,
#  canal radii, spinous length and angle, transverse process length)
SPINE_SEGMENTS = (
    ("cervical_spine", 7, (12.0, 13.0), 4.0, (10.0, 13.0), (8.0, 10.0), (12.0, 8.0), (12, 30), 10),
    ("thoracic_spine", 12, (16.0, 22.0), 5.5, (14.0, 21.0), (12.0, 17.0), (8.0, 8.0), (26, 55), 26),
    ("lumbar_spine", 5, (25.0, 25.0), 8.0, (23.0, 25.0), (17.0, 18.0), (11.0, 9.0), (18, 10), 22),
)
VERTEBRA_NAMES: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
)
"""Names of the 24 vertebrae of :attr:`BodyFrame.vertebrae`, top down."""
SPINE_TOP = 195.0
CONUS = 19  # index of L1, the lowest vertebra the spinal cord reaches
# Sagittal spine profile: body-centre y (design mm) at heights zv, giving cervical lordosis,
# thoracic kyphosis, lumbar lordosis and the sacral curve.
SPINE_Y = (
    (195, -15),
    (300, -25),
    (330, -42),
    (430, -58),
    (520, -55),
    (600, -40),
    (680, -28),
    (767, -40),
    (800, -58),
    (840, -78),
    (875, -78),
)
# Rib cage per rib 1..12: half-width, half-depth, anterior drop, angle where the bone ends (rad).
RIBS = (
    (55, 45, 30, 2.3),
    (78, 62, 50, 2.4),
    (97, 75, 70, 2.4),
    (110, 84, 85, 2.4),
    (119, 89, 95, 2.4),
    (124, 92, 100, 2.4),
    (127, 93, 100, 2.35),
    (128, 93, 95, 2.2),
    (127, 91, 85, 2.05),
    (123, 88, 75, 1.9),
    (116, 83, 50, 1.6),
    (106, 76, 35, 1.25),
)
# Trunk muscle boundary: zv, half-width, half-depth, centre y.
TRUNK = (
    (290, 62, 56, -12),
    (310, 140, 66, -14),
    (330, 160, 80, -12),
    (380, 152, 98, -4),
    (450, 147, 110, 2),
    (520, 145, 112, 2),
    (600, 137, 108, 3),
    (680, 136, 102, 3),
    (760, 152, 100, 0),
    (840, 160, 103, -5),
    (900, 156, 98, -5),
    (935, 118, 70, 0),
)
SACRUM = (
    (762, 25, 18, 12),
    (784, 22, 15, 11),
    (804, 18, 12, 10),
    (822, 14, 10, 9),
    (838, 10, 8, 8),
)
"""Sacral segments: zv and radii (x, y, z) of each ellipsoid, centred on the spine's course."""


class BodyFrame:
    """Geometry of one subject in one pose, and the ordered paint list the body is drawn from.

    Later steps overwrite earlier ones. The helpers apply the subject's proportions, so parts
    and mimics only name design positions.
    """

    def __init__(self, anatomy: SubjectAnatomy, pose: ScanPose, spacing: Sequence[float]):
        self.a = anatomy
        self.pose = pose
        self.steps: list[Paint] = []
        scale = np.asarray(anatomy.scale)
        # Thin bones (ribs, clavicles, scapula plates) are kept at least about half a voxel in
        # radius, otherwise point sampling makes them vanish on coarse grids.
        self.min_radius = 0.55 * np.asarray(spacing, float) / scale
        self.vertebrae = self._vertebrae(spacing)

    # -- coordinate helpers -------------------------------------------------------------------

    def z(self, zv: float) -> float:
        """Apply the subject's trunk and leg proportions to a design height."""
        t, leg = self.a.proportions
        if zv <= 300:
            return zv
        if zv <= 900:
            return 300 + (zv - 300) * t
        return 300 + 600 * t + (zv - 900) * leg

    def p(self, x: float, y: float, zv: float) -> tuple[float, float, float]:
        """A design point with the subject's proportions applied to its height."""
        return (float(x), float(y), float(self.z(zv)))

    def thin(self, radius: float, axis: int | None = None) -> float:
        """``radius``, raised to about half a voxel so that a thin part stays visible."""
        floor = self.min_radius.max() if axis is None else self.min_radius[axis]
        return max(radius, float(floor))

    def add(self, shape: Shape, tissue: Tissue, region: int = 0, **kw) -> None:
        self.steps.append(Paint(shape, tissue, region, **kw))

    def tube(self, points: Sequence[Sequence[float]], radius: float, tissue: Tissue, region: int):
        for p0, p1 in itertools.pairwise(points):
            self.add(Capsule(tuple(p0), tuple(p1), radius, radius), tissue, region)

    # -- spine geometry -----------------------------------------------------------------------

    def spine_x(self, zv: float) -> float:
        t = np.clip((zv - SPINE_TOP) / (767.0 - SPINE_TOP), 0.0, 1.0)
        return float(self.a.scoliosis * math.sin(math.pi * t) + self.a.spine_tilt * t)

    def spine_y(self, zv: float) -> float:
        zs, ys = np.array(SPINE_Y, float).T
        straight = np.interp(zv, [zs[0], 767.0], [ys[0], -40.0])
        curve = np.interp(zv, zs, ys)
        return float(straight + self.a.spine_curvature * (curve - straight))

    def _vertebrae(self, spacing: Sequence[float]) -> list[Vertebra]:
        """Stack the 24 vertebral bodies from C1 down, discs between them.

        A disc is kept at least 0.75 slice thick (or 40% of the segment) so the stack of
        bodies and discs stays visible at coarse slice spacing; the segment length is unchanged.
        The canal keeps at least one voxel of CSF around the cord, so the cord never touches bone.
        """
        min_disc = 0.75 * spacing[2] / self.a.scale[2]
        voxel = np.asarray(spacing, float) / np.asarray(self.a.scale)
        out, zv = [], SPINE_TOP
        for name, count, heights, disc, rx, ry, canal, spinous, transverse in SPINE_SEGMENTS:
            for i in range(count):
                f = i / max(count - 1, 1)
                pitch = heights[0] + f * (heights[1] - heights[0]) + disc
                disc_i = max(disc, min(min_disc, 0.4 * pitch))
                height = pitch - disc_i
                cord, canal_i = None, canal
                if len(out) <= CONUS:
                    cord = (max(0.55 * canal[0], 3.5), max(0.55 * canal[1], 3.5))
                    canal_i = (max(canal[0], cord[0] + voxel[0]), max(canal[1], cord[1] + voxel[1]))
                out.append(
                    Vertebra(
                        region=SKELETON_CLASSES[name],
                        z=zv + height / 2,
                        half_height=height / 2,
                        radii=(rx[0] + f * (rx[1] - rx[0]), ry[0] + f * (ry[1] - ry[0])),
                        canal=canal_i,
                        cord=cord,
                        spinous=spinous,
                        transverse=transverse,
                        disc_below=disc_i,
                    )
                )
                zv += pitch
        return out

    def canal_y(self, v: Vertebra) -> float:
        """Centre y of the spinal canal behind vertebra ``v``."""
        return self.spine_y(v.z) - v.radii[1] - 1.0 - v.canal[1]

    def trunk(self, grow: float = 0.0, power: float = 2.4) -> Swept:
        """The trunk's muscle boundary (``grow`` mm larger or, negative, smaller)."""
        zs, a, b, cy = np.array(TRUNK, float).T
        return Swept(
            z=tuple(self.z(v) for v in zs),
            cx=tuple(0.0 for _ in zs),
            cy=tuple(cy),
            a=tuple(np.maximum(a * self.a.width + grow, 10.0)),
            b=tuple(np.maximum(b * self.a.depth + grow, 10.0)),
            power=power,
        )

    def arm_points(self, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shoulder joint, elbow and wrist of one arm (side +1 right, -1 left)."""
        abduction = self.pose.abduction[0 if side > 0 else 1]
        length = (self.a.proportions[0] + self.a.proportions[1]) / 2
        shoulder = np.array(self.p(side * 175.0 * self.a.shoulder_width, -8.0, 350.0))
        alpha = math.radians(abduction)
        elbow = shoulder + ARM_LENGTHS[0] * length * np.array(
            [side * math.sin(alpha), 0.0, math.cos(alpha)]
        )
        beta = alpha + math.radians(1.0)
        wrist = elbow + ARM_LENGTHS[1] * length * np.array(
            [side * math.sin(beta), 0.12, math.cos(beta)]
        )
        return shoulder, elbow, wrist

    def leg_points(self, side: int) -> dict[str, np.ndarray]:
        """Hip joint, thigh, knee, calf and ankle of one leg (side +1 right, -1 left)."""
        return {
            "hip": np.array(self.p(side * 88.0, 0.0, 850.0)),
            "thigh": np.array(self.p(side * 95.0, -5.0, 880.0)),
            "knee": np.array(self.p(side * 85.0, 5.0, 1270.0)),
            "calf": np.array(self.p(side * 86.0, -8.0, 1390.0)),
            "ankle": np.array(self.p(side * 80.0, 0.0, 1665.0)),
        }

    def rib_cage(self, k: int) -> tuple[float, float, float, float]:
        """Rib ``k`` (1-12): thoracic vertebra centre zv, half-width, half-depth, centre y."""
        v = self.vertebrae[7 + k - 1]
        ax, by, _, _ = RIBS[k - 1]
        tip_y = self.canal_y(v) - 3.0
        return v.z, ax * self.a.width**0.5, by * self.a.depth**0.5, tip_y - 8.0 + by

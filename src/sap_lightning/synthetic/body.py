"""The body: skeleton, organs, muscles and distractors as shapes in design space."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sap_lightning.synthetic.anatomy import _ARM_LENGTHS, ScanPose, SubjectAnatomy
from sap_lightning.synthetic.geometry import (
    Capsule,
    Cylinder,
    Ellipsoid,
    Shape,
    Swept,
    _frame,
    _grown,
    _plus,
    rotation,
)
from sap_lightning.synthetic.tissues import (
    _SOFT_TISSUES,
    OTHER_BONE_REGION,
    RIB_REGION,
    SKELETON_CLASSES,
    Tissue,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# The body
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paint:
    """One drawing step: fill ``shape`` with ``tissue`` and bone ``region`` (0 = not bone).

    ``over`` restricts the fill to voxels currently holding one of those tissues;
    ``clear_of_bone`` additionally keeps it one voxel away from any bone.
    """

    shape: Shape
    tissue: Tissue
    region: int = 0
    over: tuple[Tissue, ...] | None = None
    clear_of_bone: bool = False


@dataclass(frozen=True)
class _Vertebra:
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
_SPINE_SEGMENTS = (
    ("cervical_spine", 7, (12.0, 13.0), 4.0, (10.0, 13.0), (8.0, 10.0), (12.0, 8.0), (12, 30), 10),
    ("thoracic_spine", 12, (16.0, 22.0), 5.5, (14.0, 21.0), (12.0, 17.0), (8.0, 8.0), (26, 55), 26),
    ("lumbar_spine", 5, (25.0, 25.0), 8.0, (23.0, 25.0), (17.0, 18.0), (11.0, 9.0), (18, 10), 22),
)
_SPINE_TOP = 195.0
_CONUS = 19  # index of L1, the lowest vertebra the spinal cord reaches
# Sagittal spine profile: body-centre y (design mm) at heights zv, giving cervical lordosis,
# thoracic kyphosis, lumbar lordosis and the sacral curve.
_SPINE_Y = (
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
_RIBS = (
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
_TRUNK = (
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


class _BodyBuilder:
    """Turns a :class:`SubjectAnatomy` and a :class:`ScanPose` into an ordered paint list.

    Later steps overwrite earlier ones: outline (fat), muscle, organs, bones, spinal canal and
    cord, lymph nodes. All numbers are design mm (see the module docstring).
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
        return (float(x), float(y), float(self.z(zv)))

    def thin(self, radius: float, axis: int | None = None) -> float:
        floor = self.min_radius.max() if axis is None else self.min_radius[axis]
        return max(radius, float(floor))

    def add(self, shape: Shape, tissue: Tissue, region: int = 0, **kw) -> None:
        self.steps.append(Paint(shape, tissue, region, **kw))

    def tube(self, points: Sequence[Sequence[float]], radius: float, tissue: Tissue, region: int):
        for p0, p1 in itertools.pairwise(points):
            self.add(Capsule(tuple(p0), tuple(p1), radius, radius), tissue, region)

    # -- spine geometry -----------------------------------------------------------------------

    def spine_x(self, zv: float) -> float:
        t = np.clip((zv - _SPINE_TOP) / (767.0 - _SPINE_TOP), 0.0, 1.0)
        return float(self.a.scoliosis * math.sin(math.pi * t) + self.a.spine_tilt * t)

    def spine_y(self, zv: float) -> float:
        zs, ys = np.array(_SPINE_Y, float).T
        straight = np.interp(zv, [zs[0], 767.0], [ys[0], -40.0])
        curve = np.interp(zv, zs, ys)
        return float(straight + self.a.spine_curvature * (curve - straight))

    def _vertebrae(self, spacing: Sequence[float]) -> list[_Vertebra]:
        """Stack the 24 vertebral bodies from C1 down, discs between them.

        A disc is kept at least 0.75 slice thick (or 40% of the segment) so the stack of
        bodies and discs stays visible at coarse slice spacing; the segment length is unchanged.
        The canal keeps at least one voxel of CSF around the cord, so the cord never touches bone.
        """
        min_disc = 0.75 * spacing[2] / self.a.scale[2]
        voxel = np.asarray(spacing, float) / np.asarray(self.a.scale)
        out, zv = [], _SPINE_TOP
        for name, count, heights, disc, rx, ry, canal, spinous, transverse in _SPINE_SEGMENTS:
            for i in range(count):
                f = i / max(count - 1, 1)
                pitch = heights[0] + f * (heights[1] - heights[0]) + disc
                disc_i = max(disc, min(min_disc, 0.4 * pitch))
                height = pitch - disc_i
                cord, canal_i = None, canal
                if len(out) <= _CONUS:
                    cord = (max(0.55 * canal[0], 3.5), max(0.55 * canal[1], 3.5))
                    canal_i = (max(canal[0], cord[0] + voxel[0]), max(canal[1], cord[1] + voxel[1]))
                out.append(
                    _Vertebra(
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

    def canal_y(self, v: _Vertebra) -> float:
        return self.spine_y(v.z) - v.radii[1] - 1.0 - v.canal[1]

    # -- body parts ---------------------------------------------------------------------------

    def build(self) -> list[Paint]:
        self.outline()
        self.viscera()
        self.head()
        self.ribs()
        self.shoulder_girdle()
        self.sternum()
        self.pelvis()
        self.legs_bones()
        self.arm_bones()
        self.spine()
        self.lymph_nodes()
        return self.steps

    def trunk(self, grow: float = 0.0, power: float = 2.4) -> Swept:
        """The trunk's muscle boundary (``grow`` mm larger or, negative, smaller)."""
        zs, a, b, cy = np.array(_TRUNK, float).T
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
        elbow = shoulder + _ARM_LENGTHS[0] * length * np.array(
            [side * math.sin(alpha), 0.0, math.cos(alpha)]
        )
        beta = alpha + math.radians(1.0)
        wrist = elbow + _ARM_LENGTHS[1] * length * np.array(
            [side * math.sin(beta), 0.12, math.cos(beta)]
        )
        return shoulder, elbow, wrist

    def leg_points(self, side: int) -> dict[str, np.ndarray]:
        return {
            "hip": np.array(self.p(side * 88.0, 0.0, 850.0)),
            "thigh": np.array(self.p(side * 95.0, -5.0, 880.0)),
            "knee": np.array(self.p(side * 85.0, 5.0, 1270.0)),
            "calf": np.array(self.p(side * 86.0, -8.0, 1390.0)),
            "ankle": np.array(self.p(side * 80.0, 0.0, 1665.0)),
        }

    def outline(self) -> None:
        """Muscle-bounded body parts wrapped in subcutaneous fat (the skin outline).

        The part sizes are the muscle boundary, which contains the skeleton whatever the build;
        fat is added outside it, so a heavier subject is wider, never a thinner-boned one.
        """
        fat, limb_fat = self.a.fat, 0.6 * self.a.fat
        neck_z = tuple(self.z(v) for v in (200, 320))
        parts: list[tuple[Shape, float]] = [
            (Ellipsoid(self.p(0, 0, 118), (72, 92, 114)), 8.0),
            (Swept(neck_z, (0, 0), (-10, -12), (48, 56), (62, 62)), 0.5 * fat),
            (self.trunk(), fat),
        ]
        for side in (1, -1):
            shoulder, elbow, wrist = self.arm_points(side)
            hand = wrist + 0.3 * (wrist - elbow)
            leg = self.leg_points(side)
            parts += [
                # Trapezius and deltoid: neck base to shoulder, over clavicle and acromion.
                (
                    Capsule(
                        self.p(side * 40, -14, 300), _plus(shoulder, -side * 5, -2, -15), 40, 44
                    ),
                    0.5 * fat,
                ),
                (Capsule(tuple(shoulder), tuple(elbow), 40, 32), limb_fat),
                (Capsule(tuple(elbow), tuple(wrist), 32, 22), limb_fat),
                (Ellipsoid(tuple(hand), (14, 40, 74)), 4.0),
                (Capsule(tuple(leg["thigh"]), tuple(leg["knee"]), 80, 50), limb_fat),
                (Capsule(tuple(leg["knee"]), tuple(leg["calf"]), 50, 52), limb_fat),
                (Capsule(tuple(leg["calf"]), tuple(leg["ankle"]), 52, 28), limb_fat),
                (Ellipsoid(self.p(side * 80, 55, 1715), (36, 108, 29)), 6.0),
            ]
        for muscle, thickness in parts:
            self.add(_grown(muscle, thickness), Tissue.FAT)
        for muscle, _ in parts:
            self.add(muscle, Tissue.MUSCLE)

    def rib_cage(self, k: int) -> tuple[float, float, float, float]:
        """Rib ``k`` (1-12): thoracic vertebra centre zv, half-width, half-depth, centre y."""
        v = self.vertebrae[7 + k - 1]
        ax, by, _, _ = _RIBS[k - 1]
        tip_y = self.canal_y(v) - 3.0
        return v.z, ax * self.a.width**0.5, by * self.a.depth**0.5, tip_y - 8.0 + by

    def viscera(self) -> None:
        """Abdominal contents, paraspinal muscles, lungs, heart, great vessels and organs."""
        cavity = self.trunk(grow=-20.0, power=2.0)
        keep = [i for i, v in enumerate(cavity.z) if self.z(560) <= v <= self.z(905)]
        self.add(
            Swept(
                *(tuple(np.asarray(getattr(cavity, f))[keep]) for f in ("z", "cx", "cy", "a", "b"))
            ),
            Tissue.BOWEL,
        )
        # Paraspinal and psoas muscles keep the bowel in front of the spine.
        zs = [v.z for v in self.vertebrae[7:]] + [790.0]
        self.add(
            Swept(
                tuple(self.z(v) for v in zs),
                tuple(self.spine_x(v) for v in zs),
                tuple(self.spine_y(v) - 25 for v in zs),
                (60,) * len(zs),
                (48,) * len(zs),
            ),
            Tissue.MUSCLE,
        )
        for side in (1, -1):
            l1 = self.vertebrae[19]
            self.add(
                Capsule(
                    self.p(self.spine_x(l1.z) + side * 28, self.spine_y(l1.z), l1.z),
                    self.p(side * 95, 10, 895),
                    14,
                    24,
                ),
                Tissue.MUSCLE,
                over=(Tissue.BOWEL,),
            )

        # Lungs: inside the rib cage, from above rib 1 down to the diaphragm (right side higher).
        levels = [self.rib_cage(k) for k in range(1, 11)]
        for side, base_extra in ((1, 0.0), (-1, 14.0)):
            zs = [levels[0][0] - 18] + [
                zv + 0.35 * _RIBS[k][2] for k, (zv, *_) in enumerate(levels)
            ]
            zs[-1] += base_extra
            widths = [12.0] + [0.44 * ax - 6 for _, ax, _, _ in levels]
            depths = [18.0] + [0.82 * by for _, _, by, _ in levels]
            cys = [levels[0][3] - 10] + [cy + 0.02 * by for _, _, by, cy in levels]
            widths[-1], depths[-1] = 0.5 * widths[-2], 0.6 * depths[-2]
            cxs = [side * (0.48 * ax + 2) for ax in [levels[0][1]] + [lv[1] for lv in levels]]
            self.add(
                Swept(
                    tuple(self.z(v) for v in zs),
                    tuple(cxs),
                    tuple(cys),
                    tuple(widths),
                    tuple(depths),
                ),
                Tissue.LUNG,
            )
        right_base = self.z(levels[-1][0] + 0.35 * _RIBS[9][2])
        s = self.a.organ_scale
        t7 = self.vertebrae[13]
        heart_axes = rotation("y", -35.0) @ rotation("z", 20.0)
        self.add(
            Ellipsoid(
                self.p(-25, self.spine_y(t7.z) + 95, t7.z + 40),
                (52 * s, 44 * s, 62 * s),
                heart_axes,
            ),
            Tissue.HEART,
        )
        # Descending aorta (left, in front of the spine) and inferior vena cava (right).
        zs = [v.z for v in self.vertebrae[10:23]]
        for dx, dy, r, first in ((-16.0, 24.0, 11.0, 0), (22.0, 30.0, 12.0, 6)):
            self.add(
                Swept(
                    tuple(self.z(v) for v in zs[first:]),
                    tuple(self.spine_x(v) + dx for v in zs[first:]),
                    tuple(self.spine_y(v) + dy for v in zs[first:]),
                    (r,) * (len(zs) - first),
                    (r,) * (len(zs) - first),
                ),
                Tissue.VESSEL,
            )
        self.add(Ellipsoid((60, 10, right_base + 70 * s), (90 * s, 80 * s, 70 * s)), Tissue.LIVER)
        self.add(Ellipsoid((-15, 45, right_base + 55 * s), (55 * s, 40 * s, 35 * s)), Tissue.LIVER)
        self.add(
            Ellipsoid((-88, -35, right_base + 60), (30 * s, 42 * s, 52 * s), rotation("z", 25)),
            Tissue.SPLEEN,
        )
        t12 = self.vertebrae[18]
        for side, drop in ((1, 18.0), (-1, 0.0)):
            self.add(
                Ellipsoid(
                    self.p(
                        side * 62, self.spine_y(t12.z) - 5, t12.z + 45 + drop + self.a.kidney_drop
                    ),
                    (26 * s, 24 * s, 52 * s),
                    rotation("y", side * 12.0) @ rotation("z", side * 25.0),
                ),
                Tissue.KIDNEY,
            )
        f = self.a.bladder_fill
        self.add(Ellipsoid(self.p(0, 28, 858 - 10 * f), (48 * f, 36 * f, 34 * f)), Tissue.BLADDER)

    def head(self) -> None:
        """Skull (unlabelled bone) around the brain."""
        self.add(Ellipsoid(self.p(0, -5, 102), (68, 86, 92)), Tissue.BONE, OTHER_BONE_REGION)
        shell = self.thin(7.0, axis=2)
        self.add(Ellipsoid(self.p(0, -5, 104), (68 - shell, 86 - shell, 92 - shell)), Tissue.BRAIN)

    def ribs(self) -> None:
        """Twelve pairs of ribs from the transverse processes around the chest (unlabelled)."""
        for k in range(1, 13):
            zv, ax, by, cy = self.rib_cage(k)
            v = self.vertebrae[7 + k - 1]
            _, _, drop, theta_end = _RIBS[k - 1]
            x0 = self.spine_x(zv)
            radius = self.thin(6.0 if k <= 2 else 5.5)
            tip_x = v.canal[0] + v.transverse
            theta0 = math.asin(min(0.95, tip_x / ax))
            for side in (1, -1):
                points = [
                    self.p(
                        x0 + side * ax * math.sin(t),
                        cy - by * math.cos(t),
                        zv + drop * ((1 - math.cos(t)) - (1 - math.cos(theta0))) / 2,
                    )
                    for t in np.linspace(theta0, theta_end, 10)
                ]
                self.tube(points, radius, Tissue.BONE, RIB_REGION)

    def shoulder_girdle(self) -> None:
        """Scapulae (plates on the back of the chest with spine and glenoid) and clavicles."""
        scapula, clavicle = SKELETON_CLASSES["scapulae"], SKELETON_CLASSES["clavicles"]
        for side in (1, -1):
            shoulder, _, _ = self.arm_points(side)
            sx = abs(shoulder[0])
            angle = math.radians(25.0)
            axes = _frame((side * math.cos(angle), math.sin(angle), 0.0), (0.0, 0.0, 1.0))
            self.add(
                Ellipsoid(
                    self.p(side * 0.57 * sx, -68, 408), (44, 70, self.thin(5.0, axis=1)), axes
                ),
                Tissue.BONE,
                scapula,
            )
            glenoid = shoulder + np.array([-side * 24.0, -6.0, 0.0])
            self.add(Ellipsoid(tuple(glenoid), (9, 14, 20)), Tissue.BONE, scapula)
            self.add(
                Capsule(
                    self.p(side * 0.4 * sx, -74, 372),
                    _plus(glenoid, 0, -8, -18),
                    self.thin(6),
                    self.thin(8),
                ),
                Tissue.BONE,
                scapula,
            )
            acromion = shoulder + np.array([-side * 10.0, -6.0, -28.0])
            self.add(
                Ellipsoid(tuple(acromion), (18, 12, self.thin(6, axis=2))), Tissue.BONE, scapula
            )
            points = [
                self.p(side * 20, 38, 336),
                self.p(side * 0.33 * sx, 42, 330),
                self.p(side * 0.65 * sx, 18, 322),
                tuple(acromion + np.array([-side * 16.0, 6.0, 2.0])),
            ]
            self.tube(points, self.thin(7.0), Tissue.BONE, clavicle)

    def sternum(self) -> None:
        sternum = SKELETON_CLASSES["sternum"]
        thick = self.thin(7.0, axis=1)
        self.add(Ellipsoid(self.p(0, 42, 350), (24, thick, 22)), Tissue.BONE, sternum)
        top, bottom = np.array(self.p(0, 48, 372)), np.array(self.p(0, 84, 492))
        axes = _frame((1.0, 0.0, 0.0), (0.0, *(bottom - top)[1:]))
        # Local axes: x (width), thickness, long axis along the sternal body.
        axes = np.stack([axes[:, 0], axes[:, 2], axes[:, 1]], axis=1)
        self.add(
            Cylinder(
                tuple((top + bottom) / 2),
                (17.0, self.thin(6.0, axis=1)),
                float(np.linalg.norm(bottom - top) / 2),
                axes,
            ),
            Tissue.BONE,
            sternum,
        )
        self.add(Ellipsoid(self.p(0, 88, 506), (9, self.thin(5, axis=1), 14)), Tissue.BONE, sternum)

    def pelvis(self) -> None:
        """Sacrum, iliac wings, acetabula, pubic and ischial rami (one label); hip sockets."""
        pelvis = SKELETON_CLASSES["pelvis"]
        x0 = self.spine_x(800)
        sacrum = (
            (762, 25, 18, 12),
            (784, 22, 15, 11),
            (804, 18, 12, 10),
            (822, 14, 10, 9),
            (838, 10, 8, 8),
        )
        for zv, rx, ry, rz in sacrum:
            self.add(Ellipsoid(self.p(x0, self.spine_y(zv), zv), (rx, ry, rz)), Tissue.BONE, pelvis)
        self.add(
            Capsule(
                self.p(x0, self.spine_y(845), 845),
                self.p(x0, self.spine_y(875) + 8, 872),
                self.thin(5),
                self.thin(4),
            ),
            Tissue.BONE,
            pelvis,
        )
        for side in (1, -1):
            hip = self.leg_points(side)["hip"]
            self.add(
                Ellipsoid(self.p(x0 + side * 36, self.spine_y(770) - 2, 772), (28, 20, 26)),
                Tissue.BONE,
                pelvis,
            )
            wing_axes = _frame((side * 0.57, 0.82, 0.0), (side * 0.3, 0.0, -0.95))
            self.add(
                Ellipsoid(self.p(side * 88, -12, 758), (55, 48, self.thin(7, axis=0)), wing_axes),
                Tissue.BONE,
                pelvis,
            )
            self.add(
                Capsule(self.p(side * 72, -30, 790), _plus(hip, 0, -4, -20), 20, 22),
                Tissue.BONE,
                pelvis,
            )
            self.add(Ellipsoid(tuple(hip), (33, 33, 33)), Tissue.BONE, pelvis)
            self.add(
                Capsule(
                    _plus(hip, -side * 15, 18, 10),
                    self.p(side * 12, 52, 872),
                    self.thin(11),
                    self.thin(11),
                ),
                Tissue.BONE,
                pelvis,
            )
            self.add(Ellipsoid(self.p(side * 16, 52, 880), (11, 12, 20)), Tissue.BONE, pelvis)
            tuberosity = self.p(side * 60, -22, 920)
            self.add(Capsule(_plus(hip, 0, -18, 14), tuberosity, 15, 14), Tissue.BONE, pelvis)
            self.add(
                Capsule(tuberosity, self.p(side * 14, 45, 895), self.thin(9), self.thin(9)),
                Tissue.BONE,
                pelvis,
            )
            # Hip joint space, so the femoral head sits in its socket without merging into it.
            self.add(Ellipsoid(tuple(hip), (26, 26, 26)), Tissue.MUSCLE)

    def legs_bones(self) -> None:
        femur = SKELETON_CLASSES["femurs"]
        for side in (1, -1):
            leg = self.leg_points(side)
            hip = leg["hip"]
            neck_end = np.array(self.p(side * 128, -3, 880))
            self.add(Ellipsoid(tuple(hip), (23, 23, 23)), Tissue.BONE, femur)
            self.add(Capsule(tuple(hip), tuple(neck_end), 15, 16), Tissue.BONE, femur)
            self.add(Ellipsoid(self.p(side * 143, -10, 872), (17, 20, 26)), Tissue.BONE, femur)
            self.add(Ellipsoid(self.p(side * 115, -15, 910), (10, 10, 12)), Tissue.BONE, femur)
            knee = leg["knee"]
            shaft_end = knee + np.array([0.0, 3.0, -20.0])
            self.add(
                Capsule(self.p(side * 134, -2, 890), tuple(shaft_end), 15, 13), Tissue.BONE, femur
            )
            self.add(Ellipsoid(_plus(knee, 0, 0, -12), (40, 30, 22)), Tissue.BONE, femur)
            # Below the knee: patella, tibia, fibula and foot (bone, unlabelled).
            other = OTHER_BONE_REGION
            ankle = leg["ankle"]
            self.add(Ellipsoid(_plus(knee, 0, 45, -20), (20, 9, 22)), Tissue.BONE, other)
            self.add(Ellipsoid(_plus(knee, 0, 5, 16), (38, 28, 16)), Tissue.BONE, other)
            self.add(
                Capsule(_plus(knee, -side * 3, 7, 20), _plus(ankle, 0, 10, -5), 16, 11),
                Tissue.BONE,
                other,
            )
            self.add(
                Capsule(
                    _plus(knee, side * 25, -10, 30),
                    _plus(ankle, side * 14, -5, -10),
                    self.thin(7),
                    self.thin(7),
                ),
                Tissue.BONE,
                other,
            )
            self.add(Ellipsoid(self.p(side * 80, 45, 1712), (22, 75, 16)), Tissue.BONE, other)

    def arm_bones(self) -> None:
        humerus = SKELETON_CLASSES["humeri"]
        for side in (1, -1):
            shoulder, elbow, wrist = self.arm_points(side)
            down = (elbow - shoulder) / np.linalg.norm(elbow - shoulder)
            self.add(Ellipsoid(tuple(shoulder), (23, 23, 23)), Tissue.BONE, humerus)
            self.add(
                Capsule(tuple(shoulder), tuple(elbow - 15 * down), 11, 10), Tissue.BONE, humerus
            )
            self.add(Ellipsoid(tuple(elbow - 12 * down), (28, 14, 14)), Tissue.BONE, humerus)
            for dy in (9.0, -9.0):  # radius (front) and ulna (back)
                offset = np.array([0.0, dy, 0.0])
                self.add(
                    Capsule(
                        tuple(elbow + 6 * down + offset),
                        tuple(wrist + offset),
                        self.thin(7),
                        self.thin(7),
                    ),
                    Tissue.BONE,
                    OTHER_BONE_REGION,
                )
            hand = wrist + 0.3 * (wrist - elbow)
            self.add(Ellipsoid(tuple(hand), (8, 26, 40)), Tissue.BONE, OTHER_BONE_REGION)

    def spine(self) -> None:
        """Vertebral bodies with discs, neural arches and processes; canal, CSF and cord."""
        for i, v in enumerate(self.vertebrae):
            x, y = self.spine_x(v.z), self.spine_y(v.z)
            if i + 1 < len(self.vertebrae):
                z_disc = v.z + v.half_height + v.disc_below / 2
                self.add(
                    Cylinder(
                        self.p(x, self.spine_y(z_disc), z_disc), v.radii, v.disc_below / 2 + 0.5
                    ),
                    Tissue.DISC,
                )
            self.add(Cylinder(self.p(x, y, v.z), v.radii, v.half_height), Tissue.BONE, v.region)
            cy = self.canal_y(v)
            arch = (v.canal[0] + self.thin(5.0, 0), v.canal[1] + self.thin(5.0, 1))
            self.add(Cylinder(self.p(x, cy, v.z), arch, 0.8 * v.half_height), Tissue.BONE, v.region)
            length, angle = v.spinous
            back = cy - v.canal[1] - 3
            tip = (
                x,
                back - length * math.cos(math.radians(angle)),
                v.z + length * math.sin(math.radians(angle)),
            )
            self.add(
                Capsule(self.p(x, back, v.z), self.p(*tip), self.thin(5), self.thin(4)),
                Tissue.BONE,
                v.region,
            )
            for side in (1, -1):
                self.add(
                    Capsule(
                        self.p(x + side * (v.canal[0] + 3), cy, v.z),
                        self.p(x + side * (v.canal[0] + v.transverse), cy - 3, v.z),
                        self.thin(5),
                        self.thin(4.5),
                    ),
                    Tissue.BONE,
                    v.region,
                )
        # Canal from the foramen magnum to the sacrum; cord from the brainstem to the conus.
        top, spine = self.vertebrae[0], self.vertebrae
        zs = [150.0] + [v.z for v in spine] + [790.0, 815.0]
        cxs = [self.spine_x(z) for z in zs]
        cys = [self.canal_y(v) for v in [top, *spine]]
        cys += [self.spine_y(790) - 25.0, self.spine_y(815) - 20.0]
        canal = [(top.canal[0] + 1, top.canal[1] + 4)] + [v.canal for v in spine]
        canal += [(9.0, 6.0), (5.0, 4.0)]
        self.add(
            Swept(
                tuple(self.z(z) for z in zs),
                tuple(cxs),
                tuple(cys),
                tuple(a for a, _ in canal),
                tuple(b for _, b in canal),
            ),
            Tissue.CSF,
        )
        cord = [spine[0].cord] + [v.cord for v in spine if v.cord] + [(2.0, 2.0)]
        n = len(cord)  # ends (tapered) at the vertebra below the conus
        self.add(
            Swept(
                tuple(self.z(z) for z in zs[:n]),
                tuple(cxs[:n]),
                tuple(cys[:n]),
                tuple(a for a, _ in cord),
                tuple(b for _, b in cord),
            ),
            Tissue.CORD,
        )

    def lymph_nodes(self) -> None:
        for center, radii in self.a.lymph_nodes:
            x, y, zv = center
            self.add(
                Ellipsoid(self.p(x, y, zv), radii),
                Tissue.LYMPH_NODE,
                over=_SOFT_TISSUES,
                clear_of_bone=True,
            )

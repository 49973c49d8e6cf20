"""The skeleton as paint steps: skull, ribs, shoulder girdle, sternum, pelvis, limbs, spine.

Each function appends one group of bones to a :class:`~sap_lightning.synthetic.frame.BodyFrame`
(bones carry their skeleton region; ribs, skull and distal limb bones are bone but unlabelled),
in the order :func:`~sap_lightning.synthetic.body.build_body` calls them.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from sap_lightning.synthetic.frame import RIBS, SACRUM, BodyFrame
from sap_lightning.synthetic.geometry import Capsule, Cylinder, Ellipsoid, Swept, frame_axes, offset
from sap_lightning.synthetic.tissues import OTHER_BONE_REGION, RIB_REGION, SKELETON_CLASSES, Tissue

log = logging.getLogger(__name__)


def head(f: BodyFrame) -> None:
    """Skull (unlabelled bone) around the brain."""
    f.add(Ellipsoid(f.p(0, -5, 102), (68, 86, 92)), Tissue.BONE, OTHER_BONE_REGION)
    shell = f.thin(7.0, axis=2)
    f.add(Ellipsoid(f.p(0, -5, 104), (68 - shell, 86 - shell, 92 - shell)), Tissue.BRAIN)


def ribs(f: BodyFrame) -> None:
    """Twelve pairs of ribs from the transverse processes around the chest (unlabelled)."""
    for k in range(1, 13):
        zv, ax, by, cy = f.rib_cage(k)
        v = f.vertebrae[7 + k - 1]
        _, _, drop, theta_end = RIBS[k - 1]
        x0 = f.spine_x(zv)
        radius = f.thin(6.0 if k <= 2 else 5.5)
        tip_x = v.canal[0] + v.transverse
        theta0 = math.asin(min(0.95, tip_x / ax))
        for side in (1, -1):
            points = [
                f.p(
                    x0 + side * ax * math.sin(t),
                    cy - by * math.cos(t),
                    zv + drop * ((1 - math.cos(t)) - (1 - math.cos(theta0))) / 2,
                )
                for t in np.linspace(theta0, theta_end, 10)
            ]
            f.tube(points, radius, Tissue.BONE, RIB_REGION)


def shoulder_girdle(f: BodyFrame) -> None:
    """Scapulae (plates on the back of the chest with spine and glenoid) and clavicles."""
    scapula, clavicle = SKELETON_CLASSES["scapulae"], SKELETON_CLASSES["clavicles"]
    for side in (1, -1):
        shoulder, _, _ = f.arm_points(side)
        sx = abs(shoulder[0])
        angle = math.radians(25.0)
        axes = frame_axes((side * math.cos(angle), math.sin(angle), 0.0), (0.0, 0.0, 1.0))
        f.add(
            Ellipsoid(f.p(side * 0.57 * sx, -68, 408), (44, 70, f.thin(5.0, axis=1)), axes),
            Tissue.BONE,
            scapula,
        )
        glenoid = shoulder + np.array([-side * 24.0, -6.0, 0.0])
        f.add(Ellipsoid(tuple(glenoid), (9, 14, 20)), Tissue.BONE, scapula)
        f.add(
            Capsule(
                f.p(side * 0.4 * sx, -74, 372),
                offset(glenoid, 0, -8, -18),
                f.thin(6),
                f.thin(8),
            ),
            Tissue.BONE,
            scapula,
        )
        acromion = shoulder + np.array([-side * 10.0, -6.0, -28.0])
        f.add(Ellipsoid(tuple(acromion), (18, 12, f.thin(6, axis=2))), Tissue.BONE, scapula)
        points = [
            f.p(side * 20, 38, 336),
            f.p(side * 0.33 * sx, 42, 330),
            f.p(side * 0.65 * sx, 18, 322),
            tuple(acromion + np.array([-side * 16.0, 6.0, 2.0])),
        ]
        f.tube(points, f.thin(7.0), Tissue.BONE, clavicle)


def sternum(f: BodyFrame) -> None:
    sternum = SKELETON_CLASSES["sternum"]
    thick = f.thin(7.0, axis=1)
    f.add(Ellipsoid(f.p(0, 42, 350), (24, thick, 22)), Tissue.BONE, sternum)
    top, bottom = np.array(f.p(0, 48, 372)), np.array(f.p(0, 84, 492))
    axes = frame_axes((1.0, 0.0, 0.0), (0.0, *(bottom - top)[1:]))
    # Local axes: x (width), thickness, long axis along the sternal body.
    axes = np.stack([axes[:, 0], axes[:, 2], axes[:, 1]], axis=1)
    f.add(
        Cylinder(
            tuple((top + bottom) / 2),
            (17.0, f.thin(6.0, axis=1)),
            float(np.linalg.norm(bottom - top) / 2),
            axes,
        ),
        Tissue.BONE,
        sternum,
    )
    f.add(Ellipsoid(f.p(0, 88, 506), (9, f.thin(5, axis=1), 14)), Tissue.BONE, sternum)


def pelvis(f: BodyFrame) -> None:
    """Sacrum, iliac wings, acetabula, pubic and ischial rami (one label); hip sockets."""
    pelvis = SKELETON_CLASSES["pelvis"]
    x0 = f.spine_x(800)
    for zv, rx, ry, rz in SACRUM:
        f.add(Ellipsoid(f.p(x0, f.spine_y(zv), zv), (rx, ry, rz)), Tissue.BONE, pelvis)
    f.add(
        Capsule(
            f.p(x0, f.spine_y(845), 845),
            f.p(x0, f.spine_y(875) + 8, 872),
            f.thin(5),
            f.thin(4),
        ),
        Tissue.BONE,
        pelvis,
    )
    for side in (1, -1):
        hip = f.leg_points(side)["hip"]
        f.add(
            Ellipsoid(f.p(x0 + side * 36, f.spine_y(770) - 2, 772), (28, 20, 26)),
            Tissue.BONE,
            pelvis,
        )
        wing_axes = frame_axes((side * 0.57, 0.82, 0.0), (side * 0.3, 0.0, -0.95))
        f.add(
            Ellipsoid(f.p(side * 88, -12, 758), (55, 48, f.thin(7, axis=0)), wing_axes),
            Tissue.BONE,
            pelvis,
        )
        f.add(
            Capsule(f.p(side * 72, -30, 790), offset(hip, 0, -4, -20), 20, 22),
            Tissue.BONE,
            pelvis,
        )
        f.add(Ellipsoid(tuple(hip), (33, 33, 33)), Tissue.BONE, pelvis)
        f.add(
            Capsule(
                offset(hip, -side * 15, 18, 10),
                f.p(side * 12, 52, 872),
                f.thin(11),
                f.thin(11),
            ),
            Tissue.BONE,
            pelvis,
        )
        f.add(Ellipsoid(f.p(side * 16, 52, 880), (11, 12, 20)), Tissue.BONE, pelvis)
        tuberosity = f.p(side * 60, -22, 920)
        f.add(Capsule(offset(hip, 0, -18, 14), tuberosity, 15, 14), Tissue.BONE, pelvis)
        f.add(
            Capsule(tuberosity, f.p(side * 14, 45, 895), f.thin(9), f.thin(9)),
            Tissue.BONE,
            pelvis,
        )
        # Hip joint space, so the femoral head sits in its socket without merging into it.
        f.add(Ellipsoid(tuple(hip), (26, 26, 26)), Tissue.MUSCLE)


def legs_bones(f: BodyFrame) -> None:
    femur = SKELETON_CLASSES["femurs"]
    for side in (1, -1):
        leg = f.leg_points(side)
        hip = leg["hip"]
        neck_end = np.array(f.p(side * 128, -3, 880))
        f.add(Ellipsoid(tuple(hip), (23, 23, 23)), Tissue.BONE, femur)
        f.add(Capsule(tuple(hip), tuple(neck_end), 15, 16), Tissue.BONE, femur)
        f.add(Ellipsoid(f.p(side * 143, -10, 872), (17, 20, 26)), Tissue.BONE, femur)
        f.add(Ellipsoid(f.p(side * 115, -15, 910), (10, 10, 12)), Tissue.BONE, femur)
        knee = leg["knee"]
        shaft_end = knee + np.array([0.0, 3.0, -20.0])
        f.add(Capsule(f.p(side * 134, -2, 890), tuple(shaft_end), 15, 13), Tissue.BONE, femur)
        f.add(Ellipsoid(offset(knee, 0, 0, -12), (40, 30, 22)), Tissue.BONE, femur)
        # Below the knee: patella, tibia, fibula and foot (bone, unlabelled).
        other = OTHER_BONE_REGION
        ankle = leg["ankle"]
        f.add(Ellipsoid(offset(knee, 0, 45, -20), (20, 9, 22)), Tissue.BONE, other)
        f.add(Ellipsoid(offset(knee, 0, 5, 16), (38, 28, 16)), Tissue.BONE, other)
        f.add(
            Capsule(offset(knee, -side * 3, 7, 20), offset(ankle, 0, 10, -5), 16, 11),
            Tissue.BONE,
            other,
        )
        f.add(
            Capsule(
                offset(knee, side * 25, -10, 30),
                offset(ankle, side * 14, -5, -10),
                f.thin(7),
                f.thin(7),
            ),
            Tissue.BONE,
            other,
        )
        f.add(Ellipsoid(f.p(side * 80, 45, 1712), (22, 75, 16)), Tissue.BONE, other)


def arm_bones(f: BodyFrame) -> None:
    humerus = SKELETON_CLASSES["humeri"]
    for side in (1, -1):
        shoulder, elbow, wrist = f.arm_points(side)
        down = (elbow - shoulder) / np.linalg.norm(elbow - shoulder)
        f.add(Ellipsoid(tuple(shoulder), (23, 23, 23)), Tissue.BONE, humerus)
        f.add(Capsule(tuple(shoulder), tuple(elbow - 15 * down), 11, 10), Tissue.BONE, humerus)
        f.add(Ellipsoid(tuple(elbow - 12 * down), (28, 14, 14)), Tissue.BONE, humerus)
        for dy in (9.0, -9.0):  # radius (front) and ulna (back)
            offset = np.array([0.0, dy, 0.0])
            f.add(
                Capsule(
                    tuple(elbow + 6 * down + offset),
                    tuple(wrist + offset),
                    f.thin(7),
                    f.thin(7),
                ),
                Tissue.BONE,
                OTHER_BONE_REGION,
            )
        hand = wrist + 0.3 * (wrist - elbow)
        f.add(Ellipsoid(tuple(hand), (8, 26, 40)), Tissue.BONE, OTHER_BONE_REGION)


def spine(f: BodyFrame) -> None:
    """Vertebral bodies with discs, neural arches and processes; canal, CSF and cord."""
    for i, v in enumerate(f.vertebrae):
        x, y = f.spine_x(v.z), f.spine_y(v.z)
        if i + 1 < len(f.vertebrae):
            z_disc = v.z + v.half_height + v.disc_below / 2
            f.add(
                Cylinder(f.p(x, f.spine_y(z_disc), z_disc), v.radii, v.disc_below / 2 + 0.5),
                Tissue.DISC,
            )
        f.add(Cylinder(f.p(x, y, v.z), v.radii, v.half_height), Tissue.BONE, v.region)
        cy = f.canal_y(v)
        arch = (v.canal[0] + f.thin(5.0, 0), v.canal[1] + f.thin(5.0, 1))
        f.add(Cylinder(f.p(x, cy, v.z), arch, 0.8 * v.half_height), Tissue.BONE, v.region)
        length, angle = v.spinous
        back = cy - v.canal[1] - 3
        tip = (
            x,
            back - length * math.cos(math.radians(angle)),
            v.z + length * math.sin(math.radians(angle)),
        )
        f.add(
            Capsule(f.p(x, back, v.z), f.p(*tip), f.thin(5), f.thin(4)),
            Tissue.BONE,
            v.region,
        )
        for side in (1, -1):
            f.add(
                Capsule(
                    f.p(x + side * (v.canal[0] + 3), cy, v.z),
                    f.p(x + side * (v.canal[0] + v.transverse), cy - 3, v.z),
                    f.thin(5),
                    f.thin(4.5),
                ),
                Tissue.BONE,
                v.region,
            )
    # Canal from the foramen magnum to the sacrum; cord from the brainstem to the conus.
    top, spine = f.vertebrae[0], f.vertebrae
    zs = [150.0] + [v.z for v in spine] + [790.0, 815.0]
    cxs = [f.spine_x(z) for z in zs]
    cys = [f.canal_y(v) for v in [top, *spine]]
    cys += [f.spine_y(790) - 25.0, f.spine_y(815) - 20.0]
    canal = [(top.canal[0] + 1, top.canal[1] + 4)] + [v.canal for v in spine]
    canal += [(9.0, 6.0), (5.0, 4.0)]
    f.add(
        Swept(
            tuple(f.z(z) for z in zs),
            tuple(cxs),
            tuple(cys),
            tuple(a for a, _ in canal),
            tuple(b for _, b in canal),
        ),
        Tissue.CSF,
    )
    cord = [spine[0].cord] + [v.cord for v in spine if v.cord] + [(2.0, 2.0)]
    n = len(cord)  # ends (tapered) at the vertebra below the conus
    f.add(
        Swept(
            tuple(f.z(z) for z in zs[:n]),
            tuple(cxs[:n]),
            tuple(cys[:n]),
            tuple(a for a, _ in cord),
            tuple(b for _, b in cord),
        ),
        Tissue.CORD,
    )

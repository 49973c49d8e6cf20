"""The body as an ordered paint list: soft tissues here, bones in ``skeleton``.

:func:`build_body` is the one entry point: it draws the outline (fat around muscle), the
viscera, then the skeleton (:mod:`~sap_lightning.synthetic.skeleton`), in
an order where later steps overwrite earlier ones. Lymph nodes, ganglia and the other mimics
are drawn later, around the finished anatomy (:mod:`~sap_lightning.synthetic.mimics`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from sap_lightning.synthetic import skeleton
from sap_lightning.synthetic.anatomy import ScanPose, SubjectAnatomy
from sap_lightning.synthetic.frame import RIBS, BodyFrame, Paint
from sap_lightning.synthetic.geometry import (
    Capsule,
    Ellipsoid,
    Shape,
    Swept,
    grown,
    offset,
    rotation,
)
from sap_lightning.synthetic.tissues import Tissue

log = logging.getLogger(__name__)


def build_body(anatomy: SubjectAnatomy, pose: ScanPose, spacing: Sequence[float]) -> list[Paint]:
    """The paint steps of one subject in one pose, on a grid of ``spacing`` mm."""
    f = BodyFrame(anatomy, pose, spacing)
    outline(f)
    viscera(f)
    skeleton.head(f)
    skeleton.ribs(f)
    skeleton.shoulder_girdle(f)
    skeleton.sternum(f)
    skeleton.pelvis(f)
    skeleton.legs_bones(f)
    skeleton.arm_bones(f)
    skeleton.spine(f)
    return f.steps


def outline(f: BodyFrame) -> None:
    """Muscle-bounded body parts wrapped in subcutaneous fat (the skin outline).

    The part sizes are the muscle boundary, which contains the skeleton whatever the build;
    fat is added outside it, so a heavier subject is wider, never a thinner-boned one.
    """
    fat, limb_fat = f.a.fat, 0.6 * f.a.fat
    neck_z = tuple(f.z(v) for v in (200, 320))
    parts: list[tuple[Shape, float]] = [
        (Ellipsoid(f.p(0, 0, 118), (72, 92, 114)), 8.0),
        (Swept(neck_z, (0, 0), (-10, -12), (48, 56), (62, 62)), 0.5 * fat),
        (f.trunk(), fat),
    ]
    for side in (1, -1):
        shoulder, elbow, wrist = f.arm_points(side)
        hand = wrist + 0.3 * (wrist - elbow)
        leg = f.leg_points(side)
        parts += [
            # Trapezius and deltoid: neck base to shoulder, over clavicle and acromion.
            (
                Capsule(f.p(side * 40, -14, 300), offset(shoulder, -side * 5, -2, -15), 40, 44),
                0.5 * fat,
            ),
            (Capsule(tuple(shoulder), tuple(elbow), 40, 32), limb_fat),
            (Capsule(tuple(elbow), tuple(wrist), 32, 22), limb_fat),
            (Ellipsoid(tuple(hand), (14, 40, 74)), 4.0),
            (Capsule(tuple(leg["thigh"]), tuple(leg["knee"]), 80, 50), limb_fat),
            (Capsule(tuple(leg["knee"]), tuple(leg["calf"]), 50, 52), limb_fat),
            (Capsule(tuple(leg["calf"]), tuple(leg["ankle"]), 52, 28), limb_fat),
            (Ellipsoid(f.p(side * 80, 55, 1715), (36, 108, 29)), 6.0),
        ]
    for muscle, thickness in parts:
        f.add(grown(muscle, thickness), Tissue.FAT)
    for muscle, _ in parts:
        f.add(muscle, Tissue.MUSCLE)


def viscera(f: BodyFrame) -> None:
    """Abdominal contents, paraspinal muscles, lungs, heart, great vessels and organs."""
    cavity = f.trunk(grow=-20.0, power=2.0)
    keep = [i for i, v in enumerate(cavity.z) if f.z(560) <= v <= f.z(905)]
    f.add(
        Swept(
            *(
                tuple(np.asarray(getattr(cavity, name))[keep])
                for name in ("z", "cx", "cy", "a", "b")
            )
        ),
        Tissue.BOWEL,
    )
    # Paraspinal and psoas muscles keep the bowel in front of the spine.
    zs = [v.z for v in f.vertebrae[7:]] + [790.0]
    f.add(
        Swept(
            tuple(f.z(v) for v in zs),
            tuple(f.spine_x(v) for v in zs),
            tuple(f.spine_y(v) - 25 for v in zs),
            (60,) * len(zs),
            (48,) * len(zs),
        ),
        Tissue.MUSCLE,
    )
    for side in (1, -1):
        l1 = f.vertebrae[19]
        f.add(
            Capsule(
                f.p(f.spine_x(l1.z) + side * 28, f.spine_y(l1.z), l1.z),
                f.p(side * 95, 10, 895),
                14,
                24,
            ),
            Tissue.MUSCLE,
            over=(Tissue.BOWEL,),
        )

    # Lungs: inside the rib cage, from above rib 1 down to the diaphragm (right side higher).
    levels = [f.rib_cage(k) for k in range(1, 11)]
    for side, base_extra in ((1, 0.0), (-1, 14.0)):
        zs = [levels[0][0] - 18] + [zv + 0.35 * RIBS[k][2] for k, (zv, *_) in enumerate(levels)]
        zs[-1] += base_extra
        widths = [12.0] + [0.44 * ax - 6 for _, ax, _, _ in levels]
        depths = [18.0] + [0.82 * by for _, _, by, _ in levels]
        cys = [levels[0][3] - 10] + [cy + 0.02 * by for _, _, by, cy in levels]
        widths[-1], depths[-1] = 0.5 * widths[-2], 0.6 * depths[-2]
        cxs = [side * (0.48 * ax + 2) for ax in [levels[0][1]] + [lv[1] for lv in levels]]
        f.add(
            Swept(
                tuple(f.z(v) for v in zs),
                tuple(cxs),
                tuple(cys),
                tuple(widths),
                tuple(depths),
            ),
            Tissue.LUNG,
        )
    right_base = f.z(levels[-1][0] + 0.35 * RIBS[9][2])
    s = f.a.organ_scale
    t7 = f.vertebrae[13]
    heart_axes = rotation("y", -35.0) @ rotation("z", 20.0)
    f.add(
        Ellipsoid(
            f.p(-25, f.spine_y(t7.z) + 95, t7.z + 40),
            (52 * s, 44 * s, 62 * s),
            heart_axes,
        ),
        Tissue.HEART,
    )
    # Descending aorta (left, in front of the spine) and inferior vena cava (right).
    zs = [v.z for v in f.vertebrae[10:23]]
    for dx, dy, r, first in ((-16.0, 24.0, 11.0, 0), (22.0, 30.0, 12.0, 6)):
        f.add(
            Swept(
                tuple(f.z(v) for v in zs[first:]),
                tuple(f.spine_x(v) + dx for v in zs[first:]),
                tuple(f.spine_y(v) + dy for v in zs[first:]),
                (r,) * (len(zs) - first),
                (r,) * (len(zs) - first),
            ),
            Tissue.VESSEL,
        )
    f.add(Ellipsoid((60, 10, right_base + 70 * s), (90 * s, 80 * s, 70 * s)), Tissue.LIVER)
    f.add(Ellipsoid((-15, 45, right_base + 55 * s), (55 * s, 40 * s, 35 * s)), Tissue.LIVER)
    f.add(
        Ellipsoid((-88, -35, right_base + 60), (30 * s, 42 * s, 52 * s), rotation("z", 25)),
        Tissue.SPLEEN,
    )
    t12 = f.vertebrae[18]
    for side, drop in ((1, 18.0), (-1, 0.0)):
        f.add(
            Ellipsoid(
                f.p(side * 62, f.spine_y(t12.z) - 5, t12.z + 45 + drop + f.a.kidney_drop),
                (26 * s, 24 * s, 52 * s),
                rotation("y", side * 12.0) @ rotation("z", side * 25.0),
            ),
            Tissue.KIDNEY,
        )
    fill = f.a.bladder_fill
    f.add(Ellipsoid(f.p(0, 28, 858 - 10 * fill), (48 * fill, 36 * fill, 34 * fill)), Tissue.BLADDER)

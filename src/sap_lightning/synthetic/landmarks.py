"""Where mimics go, in one body's design coordinates: bone landmarks, foramina, endplates,
lymph-node stations and organ places.

Everything is computed from a :class:`~sap_lightning.synthetic.frame.BodyFrame`, so a mimic
planned once per person (a haemangioma in L1, a node at the left groin) lands on the same
anatomy in each of that person's scans whatever the pose.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from sap_lightning.synthetic.frame import RIBS, SACRUM, VERTEBRA_NAMES, BodyFrame
from sap_lightning.synthetic.geometry import Cylinder, Ellipsoid, Shape
from sap_lightning.synthetic.tissues import RIB_REGION, SKELETON_CLASSES

log = logging.getLogger(__name__)

Anchor = tuple[np.ndarray, np.ndarray, int]
"""A bone landmark: design centre, half-extent (design mm per axis), bone region."""

_SPINE = {"cervical": "cervical_spine", "thoracic": "thoracic_spine", "lumbar": "lumbar_spine"}


def vertebral_body(f: BodyFrame, index: int) -> Anchor:
    """Vertebra ``index`` (0 = C1 ... 23 = L5): its body's centre and half-extent."""
    v = f.vertebrae[index]
    centre = np.array(f.p(f.spine_x(v.z), f.spine_y(v.z), v.z))
    return centre, np.array([*v.radii, v.half_height]), v.region


def bone_anchors(f: BodyFrame, key: str) -> list[Anchor]:
    """The landmarks of a site group (``pelvis``, ``lumbar``, ``femur_proximal``, ``ribs``, ...,
    or ``vertebra:L1``) where an in-bone mimic is seeded."""
    if key.startswith("vertebra:"):
        return [vertebral_body(f, VERTEBRA_NAMES.index(key.split(":")[1]))]
    if key in _SPINE:
        region = SKELETON_CLASSES[_SPINE[key]]
        return [vertebral_body(f, i) for i, v in enumerate(f.vertebrae) if v.region == region]
    pelvis = SKELETON_CLASSES["pelvis"]
    femur = SKELETON_CLASSES["femurs"]
    humerus = SKELETON_CLASSES["humeri"]
    out: list[Anchor] = []
    x0 = f.spine_x(800)
    if key == "pelvis":
        for zv, rx, ry, rz in SACRUM[:3]:
            out.append((np.array(f.p(x0, f.spine_y(zv), zv)), np.array([rx, ry, rz]), pelvis))
    for side in (1, -1):
        hip = f.leg_points(side)["hip"]
        if key == "pelvis":
            out += [
                (
                    np.array(f.p(x0 + side * 36, f.spine_y(770) - 2, 772)),
                    np.array([20, 14, 18]),
                    pelvis,
                ),
                (np.array(f.p(side * 88, -12, 758)), np.array([35, 30, 8]), pelvis),
                (hip + np.array([-side * 29.0, 0.0, -8.0]), np.array([5, 12, 12]), pelvis),
                (np.array(f.p(side * 60, -22, 920)), np.array([10, 10, 10]), pelvis),
                (np.array(f.p(side * 16, 52, 880)), np.array([8, 8, 14]), pelvis),
            ]
        if key in ("femur_proximal", "femur"):
            neck = (hip + np.array(f.p(side * 128, -3, 880))) / 2
            out += [
                (hip, np.array([15, 15, 15]), femur),
                (neck, np.array([10, 10, 10]), femur),
                (np.array(f.p(side * 143, -10, 872)), np.array([12, 14, 18]), femur),
            ]
        if key == "femur":
            knee = f.leg_points(side)["knee"]
            top = np.array(f.p(side * 134, -2, 890))
            out += [(top + t * (knee - top), np.array([9, 9, 20]), femur) for t in (0.3, 0.5)]
        if key in ("humerus_proximal", "humerus"):
            shoulder, elbow, _ = f.arm_points(side)
            out.append((shoulder, np.array([15, 15, 15]), humerus))
            if key == "humerus":
                out.append(((shoulder + elbow) / 2, np.array([7, 7, 20]), humerus))
        if key == "ribs":
            for k in range(1, 13):
                zv, ax, by, cy = f.rib_cage(k)
                t = 0.5 * RIBS[k - 1][3]
                point = f.p(f.spine_x(zv) + side * ax * math.sin(t), cy - by * math.cos(t), zv)
                out.append((np.array(point), np.array([6, 6, 6]), RIB_REGION))
        if key == "scapula":
            sx = abs(f.arm_points(side)[0][0])
            point = f.p(side * 0.57 * sx, -68, 408)
            out.append((np.array(point), np.array([25, 25, 35]), SKELETON_CLASSES["scapulae"]))
        if key == "clavicle":
            sx = abs(f.arm_points(side)[0][0])
            point = f.p(side * 0.4 * sx, 40, 328)
            out.append((np.array(point), np.array([15, 6, 6]), SKELETON_CLASSES["clavicles"]))
    if key == "sternum":
        out.append((np.array(f.p(0, 66, 432)), np.array([10, 5, 40]), SKELETON_CLASSES["sternum"]))
    if not out:
        raise ValueError(f"unknown bone landmark group {key!r}")
    return out


def foramen(f: BodyFrame, level: int, side: int) -> np.ndarray:
    """Design point in intervertebral foramen ``level`` (0 = C1/C2 ... 23 = L5/S1), just
    lateral to the neural arch, between the pedicles of the two vertebrae."""
    v = f.vertebrae[min(level, len(f.vertebrae) - 1)]
    z = v.z + v.half_height + v.disc_below / 2
    x = f.spine_x(z) + side * (v.canal[0] + f.thin(5.0, 0) + 3.0)
    return np.array(f.p(x, f.canal_y(v), z))


def endplate_band(f: BodyFrame, disc: str, upper: bool, thickness: float, coverage: float) -> Shape:
    """A band under one endplate of disc ``disc`` (``L4/L5``, ``L5/S1``): in the vertebra above
    (``upper``) or below it, ``thickness`` design mm, ``coverage`` of the endplate's area."""
    top, bottom = disc.split("/")
    scale = math.sqrt(coverage)
    if upper or bottom != "S1":
        v = f.vertebrae[VERTEBRA_NAMES.index(top if upper else bottom)]
        half = min(thickness, 2 * v.half_height) / 2
        z = v.z + v.half_height - half if upper else v.z - v.half_height + half
        centre = f.p(f.spine_x(v.z), f.spine_y(z), z)
        return Cylinder(centre, (v.radii[0] * scale, v.radii[1] * scale), half)
    zv, rx, ry, rz = SACRUM[0]
    half = min(thickness, rz) / 2
    z = zv - rz + half
    return Cylinder(f.p(f.spine_x(800), f.spine_y(z), z), (rx * scale, ry * scale), half)


def fracture_band(f: BodyFrame, where: str, thickness: float) -> Shape:
    """A fracture band: ``T10``..``L2`` (under the upper endplate) or ``sacral:+1`` / ``-1``
    (a vertical band in one sacral ala)."""
    if where.startswith("sacral:"):
        side = int(where.split(":")[1])
        zv, _, ry, rz = SACRUM[1]
        centre = f.p(f.spine_x(800) + side * 14.0, f.spine_y(zv), zv)
        return Ellipsoid(centre, (thickness / 2, ry, 1.6 * rz))
    v = f.vertebrae[VERTEBRA_NAMES.index(where)]
    half = min(thickness, 2 * v.half_height) / 2
    z = v.z - v.half_height + half
    return Cylinder(
        f.p(f.spine_x(v.z), f.spine_y(z), z), (0.9 * v.radii[0], 0.9 * v.radii[1]), half
    )


# Lymph-node stations: design centre (x for the right side; mirrored), y, zv, spread (sd, mm);
# y is relative to the front of the spine where marked.
STATIONS: dict[str, tuple[float, float, float, float, bool, bool]] = {
    # name: (x, y, zv, spread, y relative to the spine, paired)
    "neck": (40.0, 5.0, 250.0, 18.0, False, True),
    "supraclavicular": (60.0, 12.0, 305.0, 10.0, False, True),
    "axilla": (135.0, -15.0, 400.0, 18.0, False, True),
    "mediastinum": (12.0, 35.0, 430.0, 12.0, False, True),
    "para_aortic": (26.0, 22.0, 665.0, 30.0, True, True),
    "common_iliac": (48.0, 5.0, 775.0, 12.0, False, True),
    "pelvic_side_wall": (70.0, 12.0, 830.0, 14.0, False, True),
    "presacral": (0.0, 22.0, 805.0, 10.0, True, False),
    "inguinal": (82.0, 62.0, 918.0, 14.0, False, True),
}


def station(f: BodyFrame, name: str, side: int, jitter: np.ndarray) -> np.ndarray:
    """A design point at lymph-node station ``name`` on ``side``, moved by ``jitter`` (units of
    the station's spread)."""
    x, y, zv, spread, spine_relative, paired = STATIONS[name]
    x = side * x if paired else x
    if spine_relative:
        x += f.spine_x(zv)
        y += f.spine_y(zv)
    return np.array(f.p(x, y, zv)) + spread * np.asarray(jitter, float)


# Organs: design centre (right side; mirrored for pairs) and axis ratios of the ellipsoid.
ORGANS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "prostate": ((0.0, 25.0, 905.0), (1.0, 0.85, 0.95)),
    "seminal_vesicle": ((22.0, -5.0, 880.0), (1.8, 0.7, 0.9)),
    "testis": ((16.0, 60.0, 962.0), (0.8, 1.0, 1.3)),
    "parotid": ((52.0, 0.0, 188.0), (0.7, 1.0, 1.4)),
    "submandibular": ((30.0, 35.0, 222.0), (1.0, 1.2, 0.8)),
    "tonsil": ((14.0, 12.0, 206.0), (0.8, 0.8, 1.3)),
}


def organ_shape(
    f: BodyFrame, name: str, side: int, volume_ml: float, scale: np.ndarray
) -> Ellipsoid:
    """Organ ``name`` on ``side`` (0 unpaired) with ``volume_ml`` world mL: its axis ratios give
    world radii, divided by the subject's ``scale`` (world mm per design mm) per axis."""
    (x, y, zv), ratios = ORGANS[name]
    ratios_arr = np.asarray(ratios, float)
    radius = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi * float(np.prod(ratios_arr)))) ** (1 / 3)
    radii = radius * ratios_arr / np.asarray(scale, float)
    return Ellipsoid(f.p(side * x if side else x, y, zv), tuple(radii.tolist()))  # type: ignore[arg-type]


def bowel_target(f: BodyFrame, where: np.ndarray) -> np.ndarray:
    """A design point in the lower abdomen and pelvis from ``where`` in [0, 1]^3."""
    x = -70.0 + 140.0 * where[0]
    y = -20.0 + 70.0 * where[1]
    zv = 690.0 + 170.0 * where[2]
    return np.array(f.p(x, y, zv))

"""Shapes in design space (ellipsoids, cylinders, capsules, swept tubes)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Shapes in design space
# --------------------------------------------------------------------------------------------


class Shape(Protocol):
    """A solid in design space: a bounding box and a point-membership test."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]: ...

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray: ...


def rotation(axis: str, degrees: float) -> np.ndarray:
    """Rotation matrix about a coordinate axis ("x", "y" or "z")."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def frame_axes(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Orthonormal frame (columns) whose first axis is ``a`` and second lies in span(a, b)."""
    e0 = np.asarray(a, float) / np.linalg.norm(a)
    e1 = np.asarray(b, float) - np.dot(b, e0) * e0
    e1 /= np.linalg.norm(e1)
    return np.stack([e0, e1, np.cross(e0, e1)], axis=1)


@dataclass(frozen=True)
class Ellipsoid:
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    axes: np.ndarray | None = None  # columns: the local axes in design coordinates

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = np.asarray(self.radii, float)
        half = r if self.axes is None else np.sqrt(((self.axes * r) ** 2).sum(axis=1))
        return np.asarray(self.center) - half, np.asarray(self.center) + half

    def contains(self, x, y, z):
        d = (x - self.center[0], y - self.center[1], z - self.center[2])
        if self.axes is not None:
            a = self.axes
            d = tuple(d[0] * a[0, j] + d[1] * a[1, j] + d[2] * a[2, j] for j in range(3))
        return sum((d[j] / self.radii[j]) ** 2 for j in range(3)) <= 1.0


@dataclass(frozen=True)
class Cylinder:
    """Elliptic cylinder: radii in local axes 0 and 1, half height along local axis 2."""

    center: tuple[float, float, float]
    radii: tuple[float, float]
    half_height: float
    axes: np.ndarray | None = None

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = np.array([*self.radii, self.half_height], float)
        half = r if self.axes is None else np.abs(self.axes * r).sum(axis=1)
        return np.asarray(self.center) - half, np.asarray(self.center) + half

    def contains(self, x, y, z):
        d = (x - self.center[0], y - self.center[1], z - self.center[2])
        if self.axes is not None:
            a = self.axes
            d = tuple(d[0] * a[0, j] + d[1] * a[1, j] + d[2] * a[2, j] for j in range(3))
        inside = (d[0] / self.radii[0]) ** 2 + (d[1] / self.radii[1]) ** 2 <= 1.0
        return inside & (np.abs(d[2]) <= self.half_height)


@dataclass(frozen=True)
class Capsule:
    """Segment ``p0``-``p1`` swept by a sphere whose radius tapers from ``r0`` to ``r1``."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r0: float
    r1: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        p = np.array([self.p0, self.p1], float)
        r = max(self.r0, self.r1)
        return p.min(axis=0) - r, p.max(axis=0) + r

    def contains(self, x, y, z):
        d = np.subtract(self.p1, self.p0)
        rel = (x - self.p0[0], y - self.p0[1], z - self.p0[2])
        t = (rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) / max(float(d @ d), 1e-9)
        t = np.clip(t, 0.0, 1.0)
        dist2 = sum((rel[j] - t * d[j]) ** 2 for j in range(3))
        return dist2 <= (self.r0 + t * (self.r1 - self.r0)) ** 2


@dataclass(frozen=True)
class Swept:
    """Superelliptic cross-sections along ``zv``, interpolated linearly between knots.

    Used for the trunk, neck, lungs, spinal canal and cord: outlines whose centre and size change
    with height. ``power`` 2 is an ellipse; larger values give the flatter back of a trunk.
    """

    z: tuple[float, ...]
    cx: tuple[float, ...]
    cy: tuple[float, ...]
    a: tuple[float, ...]
    b: tuple[float, ...]
    power: float = 2.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        cx, cy, a, b = (np.asarray(v, float) for v in (self.cx, self.cy, self.a, self.b))
        lo = np.array([(cx - a).min(), (cy - b).min(), min(self.z)])
        hi = np.array([(cx + a).max(), (cy + b).max(), max(self.z)])
        return lo, hi

    def contains(self, x, y, z):
        zz = np.broadcast_to(z, np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)))
        cx, cy, a, b = (np.interp(zz, self.z, v) for v in (self.cx, self.cy, self.a, self.b))
        p = self.power
        inside = np.abs((x - cx) / a) ** p + np.abs((y - cy) / b) ** p <= 1.0
        return inside & (zz >= self.z[0]) & (zz <= self.z[-1])


def offset(point: Sequence[float], dx: float, dy: float, dz: float) -> np.ndarray:
    """``point`` moved by (dx, dy, dz) design mm."""
    return np.asarray(point, float) + np.array([dx, dy, dz])


def grown(shape: Shape, d: float) -> Shape:
    """``shape`` made ``d`` mm thicker all round (fat around a muscle boundary)."""
    if isinstance(shape, Ellipsoid):
        return Ellipsoid(shape.center, tuple(r + d for r in shape.radii), shape.axes)
    if isinstance(shape, Capsule):
        return Capsule(shape.p0, shape.p1, shape.r0 + d, shape.r1 + d)
    if isinstance(shape, Swept):
        return Swept(
            shape.z,
            shape.cx,
            shape.cy,
            tuple(v + d for v in shape.a),
            tuple(v + d for v in shape.b),
            shape.power,
        )
    raise TypeError(f"cannot grow a {type(shape).__name__}")

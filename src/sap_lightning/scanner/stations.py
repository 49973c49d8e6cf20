"""Composing overlapping stations onto one grid, with inter-station intensity standardisation.

A whole-body exam is 4-7 stations that overlap by a few centimetres. Each is resampled in world
space onto the output grid (SimpleITK, with the stations' real direction cosines: never
origin + size x spacing) and blended with weights that ramp linearly across each overlap, so no
seam remains where one station ends inside another. Coil and gain make each station's
intensities differ: starting from the centre station and going outwards, each next station is
scaled so that its mean over the overlap matches the (already scaled) previous one, on voxels
with signal in both (:func:`standardisation_factors`).

The output grid is the T1 stations' (:func:`output_grid`): the direction of the finest T1
station, its spacing, its voxel lattice, extended to cover every T1 station.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

SIGNAL_FRACTION = 0.1
"""Overlap voxels count for standardisation when both stations exceed this fraction of their
99th percentile over the overlap (air and noise would pull the means towards the noise floor)."""
MIN_OVERLAP_VOXELS = 100
"""Fewer usable overlap voxels than this: the station keeps its neighbour's factor."""
INTENSITY_INTERPOLATOR = sitk.sitkBSpline
"""Station intensities (T1, every b-value) are resampled with an interpolating cubic B-spline:
DWI arrives at about half the T1's in-plane resolution, and linear interpolation onto the finer
grid smooths away detail the DWI still holds (docs/method.md, "Scanner import round trip", has
both measured). Weights, coverage and the ADC map stay linear (an ADC value between two neighbours' is never overshot); labels nearest."""
SPLINE_MARGIN = 6
"""Voxels each station is continued by (point reflection) before spline resampling: the spline's
mirror boundary then sits where its error (decaying by 0.27 per voxel) no longer reaches the
station's own voxels, and a linear trend stays exact up to its edge."""
EDGE_WEIGHT = 1e-3
"""Weight of a station's outermost voxels, relative to one slice step of ramp (see
:func:`ramp_weights`)."""
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Grid:
    """A voxel grid in LPS world coordinates (SimpleITK's convention, index order x, y, z)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    """Row-major 3 x 3; column j is the world direction of index axis j."""

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, float).reshape(3, 3)

    def reference(
        self, low: Sequence[int] = (0, 0, 0), high: Sequence[int] | None = None
    ) -> sitk.Image:
        """An empty image on the sub-grid of indices ``low`` to ``high`` (exclusive)."""
        high = self.size if high is None else high
        size = [int(h - lo) for lo, h in zip(low, high)]
        image = sitk.Image(size, sitk.sitkFloat32)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        origin = np.asarray(self.origin) + self.matrix @ (np.asarray(low, float) * self.spacing)
        image.SetOrigin(tuple(float(v) for v in origin))
        return image

    def affine_ras(self) -> np.ndarray:
        """Voxel index (x, y, z) -> RAS+ mm, the NIfTI affine of arrays in (x, y, z) order."""
        affine = np.eye(4)
        affine[:3, :3] = _LPS_TO_RAS @ self.matrix @ np.diag(self.spacing)
        affine[:3, 3] = _LPS_TO_RAS @ np.asarray(self.origin)
        return affine

    def record(self) -> dict:
        return {
            "size_xyz": list(self.size),
            "spacing_mm": [round(s, 6) for s in self.spacing],
            "origin_lps_mm": [round(v, 4) for v in self.origin],
            "direction_lps": [round(v, 6) for v in self.direction],
            "affine_ras": np.round(self.affine_ras(), 6).tolist(),
        }


def grid_of(image: sitk.Image) -> Grid:
    return Grid(
        tuple(image.GetSize()),  # type: ignore[arg-type]
        tuple(image.GetSpacing()),  # type: ignore[arg-type]
        tuple(image.GetOrigin()),  # type: ignore[arg-type]
        tuple(image.GetDirection()),
    )


def _corner_points(image: sitk.Image) -> np.ndarray:
    """World positions of the 8 corner voxel centres of ``image`` (8 x 3)."""
    size = np.asarray(image.GetSize()) - 1
    return np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint([float(i), float(j), float(k)])
            for i in (0, size[0])
            for j in (0, size[1])
            for k in (0, size[2])
        ]
    )


def output_grid(t1_stations: Sequence[sitk.Image]) -> Grid:
    """The grid covering every T1 station on the lattice of the finest one."""
    finest = min(t1_stations, key=lambda im: float(np.prod(im.GetSpacing())))
    corners = np.concatenate([_corner_points(im) for im in t1_stations])
    index = np.array([finest.TransformPhysicalPointToContinuousIndex(p) for p in corners])
    low = np.floor(index.min(axis=0) + 1e-3)
    high = np.ceil(index.max(axis=0) - 1e-3)
    origin = finest.TransformContinuousIndexToPhysicalPoint([float(v) for v in low])
    size = tuple(int(v) for v in high - low + 1)
    return Grid(size, finest.GetSpacing(), tuple(origin), finest.GetDirection())  # type: ignore[arg-type]


def stacking_direction(images: Sequence[sitk.Image]) -> np.ndarray | None:
    """The world direction along which stations follow one another (principal axis of their
    centres); ``None`` for a single station."""
    if len(images) < 2:
        return None
    centres = np.array([_corner_points(im).mean(axis=0) for im in images])
    _, _, vt = np.linalg.svd(centres - centres.mean(axis=0))
    return vt[0]


def station_order(images: Sequence[sitk.Image], direction: np.ndarray | None) -> list[int]:
    """Indices of ``images`` sorted along ``direction`` (feet or head first, as it comes)."""
    if direction is None:
        return list(range(len(images)))
    key = [float(_corner_points(im).mean(axis=0) @ direction) for im in images]
    return sorted(range(len(images)), key=lambda i: key[i])


def ramp_weights(image: sitk.Image, direction: np.ndarray | None) -> sitk.Image:
    """Blending weight on ``image``'s grid.

    Along the index axis closest to ``direction`` the weight is the distance (mm) from the
    nearer end slice, so the weights of two overlapping stations ramp linearly across the
    overlap, from one station's first slice to the other's last. Every outermost voxel (end
    slices and in-plane borders) weighs only ``EDGE_WEIGHT`` of a slice step: beyond it the
    resampler can only repeat the border value, which then hardly counts where another station
    covers the point, and still counts alone where none does."""
    size = image.GetSize()
    weights = np.ones(size[::-1], np.float32)  # (z, y, x)
    stacking = None
    if direction is not None:
        matrix = np.asarray(image.GetDirection()).reshape(3, 3)
        stacking = int(np.argmax(np.abs(matrix.T @ direction)))
    for axis, n in enumerate(size):
        shape = [1, 1, 1]
        shape[2 - axis] = n
        if axis == stacking:
            k = np.arange(n, dtype=np.float32)
            profile = (np.minimum(k, n - 1 - k) + EDGE_WEIGHT) * float(image.GetSpacing()[axis])
        else:
            profile = np.ones(n, np.float32)
            if n > 2:
                profile[[0, -1]] = EDGE_WEIGHT
        weights = weights * profile.reshape(shape)
    out = sitk.GetImageFromArray(weights)
    out.CopyInformation(image)
    return out


@dataclass
class Placed:
    """A station resampled onto a box of the output grid: values, blending weights and the
    core (voxels inside the station's inner voxel centres, where interpolation is exact, not
    a repeated border value), numpy (z, y, x) arrays of the box ``low``..``high`` (grid indices
    x, y, z)."""

    low: tuple[int, int, int]
    high: tuple[int, int, int]
    values: np.ndarray
    weights: np.ndarray
    core: np.ndarray

    def slices(self) -> tuple[slice, slice, slice]:
        """The box as numpy (z, y, x) slices of the full grid array."""
        return tuple(slice(lo, hi) for lo, hi in zip(self.low[::-1], self.high[::-1]))  # type: ignore[return-value]


def grid_box(grid: Grid, image: sitk.Image, to_image: sitk.Transform | None = None) -> tuple | None:
    """Grid index box (low, high exclusive) holding ``image`` placed through ``to_image``."""
    size = np.asarray(image.GetSize(), float)
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
        for c in np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * size - 0.5
    ]
    if to_image is not None:
        inverse = to_image.GetInverse()
        corners = [inverse.TransformPoint(c) for c in corners]
    reference = grid.reference()
    index = np.array([reference.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    low = np.clip(np.floor(index.min(axis=0)).astype(int), 0, grid.size)
    high = np.clip(np.ceil(index.max(axis=0)).astype(int) + 1, 0, grid.size)
    if np.any(high <= low):
        return None
    return tuple(int(v) for v in low), tuple(int(v) for v in high)


def resample_onto(
    grid: Grid,
    image: sitk.Image,
    low: Sequence[int] = (0, 0, 0),
    high: Sequence[int] | None = None,
    transform: sitk.Transform | None = None,
    interpolator: int = sitk.sitkLinear,
) -> np.ndarray:
    """``image`` sampled on a box of ``grid`` in world space, (z, y, x); 0 outside it.

    ``transform`` maps output points to ``image`` points (a registration result)."""
    resampled = sitk.Resample(
        image,
        grid.reference(low, high),
        transform or sitk.Transform(),
        interpolator,
        0.0,
        image.GetPixelID() if interpolator == sitk.sitkNearestNeighbor else sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(resampled)


def resample_intensities(
    grid: Grid,
    image: sitk.Image,
    low: Sequence[int] = (0, 0, 0),
    high: Sequence[int] | None = None,
    transform: sitk.Transform | None = None,
) -> np.ndarray:
    """A magnitude image on a box of ``grid`` (:data:`INTENSITY_INTERPOLATOR`), the spline's
    undershoot at sharp edges clipped to 0: magnitudes are never negative. A station on the
    grid's own lattice (the finest T1 station, usually every T1 station) is copied: every
    interpolator returns its voxel values there, and the spline's set-up would only cost time."""
    if transform is None and _on_lattice(grid, image):
        return resample_onto(grid, image, low, high, None, sitk.sitkNearestNeighbor)
    values = resample_onto(grid, _continued(image), low, high, transform, INTENSITY_INTERPOLATOR)
    return np.clip(values, 0.0, None, out=values)


def _on_lattice(grid: Grid, image: sitk.Image, tolerance: float = 1e-3) -> bool:
    """Whether ``image``'s voxel centres are voxel centres of ``grid`` (same direction and
    spacing, origin a whole number of voxels away; ``tolerance`` in voxels)."""
    if not np.allclose(image.GetDirection(), grid.direction, atol=1e-6):
        return False
    if not np.allclose(image.GetSpacing(), grid.spacing, rtol=1e-6):
        return False
    offset = grid.matrix.T @ (np.asarray(image.GetOrigin()) - np.asarray(grid.origin))
    index = offset / np.asarray(grid.spacing)
    return bool(np.all(np.abs(index - np.rint(index)) < tolerance))


def _continued(image: sitk.Image) -> sitk.Image:
    """``image`` extended by :data:`SPLINE_MARGIN` voxels on every side by odd reflection
    (2 x edge - mirror image), on the same lattice. Only the station's own extent is blended
    (its weights are 0 beyond it), so the continuation only steadies the spline inside."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    margins = [min(SPLINE_MARGIN, n - 1) for n in array.shape]
    continued = np.pad(array, [(m, m) for m in margins], mode="reflect", reflect_type="odd")
    out = sitk.GetImageFromArray(continued)
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    shift = np.asarray(image.GetDirection()).reshape(3, 3) @ (
        np.asarray(margins[::-1], float) * np.asarray(image.GetSpacing())
    )
    out.SetOrigin(tuple(float(v) for v in np.asarray(image.GetOrigin()) - shift))
    return out


def place(
    grid: Grid,
    image: sitk.Image,
    weights: sitk.Image,
    transform: sitk.Transform | None = None,
) -> Placed | None:
    """Resample a station and its weights onto the part of ``grid`` it covers (``None`` when it
    covers nothing)."""
    box = grid_box(grid, image, transform)
    if box is None:
        return None
    low, high = box
    values = resample_intensities(grid, image, low, high, transform)
    weight = resample_onto(grid, weights, low, high, transform)
    inner = np.zeros(image.GetSize()[::-1], np.float32)
    inner[tuple(slice(1, -1) if n > 2 else slice(None) for n in inner.shape)] = 1.0
    indicator = sitk.GetImageFromArray(inner)
    indicator.CopyInformation(image)
    core = resample_onto(grid, indicator, low, high, transform) >= 0.999
    return Placed(low, high, values, np.clip(weight, 0.0, None), core)


def _overlap(a: Placed, b: Placed) -> tuple[np.ndarray, np.ndarray] | None:
    """Values of ``a`` and ``b`` on the voxels in both cores."""
    low = np.maximum(a.low, b.low)
    high = np.minimum(a.high, b.high)
    if np.any(high <= low):
        return None
    cut = []
    for placed in (a, b):
        box = tuple(
            slice(lo - own, hi - own)
            for lo, hi, own in zip(low[::-1], high[::-1], np.asarray(placed.low)[::-1])
        )
        cut.append((placed.values[box], placed.core[box]))
    both = cut[0][1] & cut[1][1]
    return cut[0][0][both], cut[1][0][both]


def overlap_ratio(a: Placed, b: Placed) -> tuple[float | None, int]:
    """mean(a) / mean(b) over their overlap where both have signal, and the voxel count."""
    found = _overlap(a, b)
    if found is None or found[0].size == 0:
        return None, 0
    va, vb = found
    signal = (va > SIGNAL_FRACTION * np.percentile(va, 99)) & (
        vb > SIGNAL_FRACTION * np.percentile(vb, 99)
    )
    count = int(signal.sum())
    if count < MIN_OVERLAP_VOXELS or float(vb[signal].mean()) <= 0:
        return None, count
    return float(va[signal].mean() / vb[signal].mean()), count


def standardisation_factors(placed: Sequence[Placed]) -> tuple[list[float], list[dict]]:
    """One factor per station (in stacking order): 1 for the centre station, then outwards each
    station scaled so its overlap mean matches its scaled inner neighbour's.

    Returns the factors and, per adjacent pair, the measured ratio and voxel count."""
    n = len(placed)
    centre = n // 2
    factors = [1.0] * n
    pairs: list[dict] = []
    for inner, outer in [(i - 1, i) for i in range(centre + 1, n)] + [
        (i + 1, i) for i in range(centre - 1, -1, -1)
    ]:
        ratio, count = overlap_ratio(placed[inner], placed[outer])
        factors[outer] = factors[inner] * (ratio if ratio is not None else 1.0)
        pairs.append(
            {
                "station": outer,
                "neighbour": inner,
                "overlap_ratio": None if ratio is None else round(ratio, 6),
                "overlap_voxels": count,
            }
        )
    return factors, pairs


def coverage(grid: Grid, placed: Sequence[Placed]) -> np.ndarray:
    """Voxels of ``grid`` some placed station covers, (z, y, x) bool: where :func:`compose` has
    a weight above 0 (elsewhere it writes 0, not an image value)."""
    covered = np.zeros(grid.size[::-1], bool)
    for station in placed:
        covered[station.slices()] |= station.weights > 0
    return covered


def compose(
    grid: Grid, placed: Sequence[Placed], factors: Sequence[float] | None = None
) -> np.ndarray:
    """Weighted blend of the placed stations, (z, y, x) float32; 0 where none covers."""
    total = np.zeros(grid.size[::-1], np.float32)
    weight = np.zeros(grid.size[::-1], np.float32)
    for i, station in enumerate(placed):
        factor = 1.0 if factors is None else float(factors[i])
        box = station.slices()
        total[box] += station.weights * station.values * factor
        weight[box] += station.weights
    covered = weight > 0
    total[covered] /= weight[covered]
    return total

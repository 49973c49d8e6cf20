"""The case picture's figure: two MIP panels in world mm, lesion outlines, a legend.

Drawn on matplotlib's Agg canvas directly (no pyplot, so a notebook's backend is never
changed); the PNG is written from the very pixels :class:`CasePicture` returns, atomically.
Panels are placed in whole pixels and sized from their extent in mm, so the physical aspect
ratio holds by construction and tests can map world mm to pixels from :class:`Panel` alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import contourpy
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.image import imsave
from matplotlib.lines import Line2D
from matplotlib.patches import Circle
from matplotlib.transforms import offset_copy
from scipy import ndimage

from sap_lightning.cache.normalize import otsu_threshold
from sap_lightning.core.io import atomic_path
from sap_lightning.core.lesions import check_connectivity, voxel_volume_ml
from sap_lightning.core.protocol import DEFAULT_CONNECTIVITY
from sap_lightning.dataset.images import to_canonical
from sap_lightning.dataset.layout import CHANNEL_NAMES
from sap_lightning.inference.pictures.content import (
    MIN_OUTLINE_MM,
    OUTLINE_MARGIN_MM,
    SKELETON_COLOUR,
    Colour,
    Content,
    LegendEntry,
    LesionToDraw,
    VolumeGrid,
    case_content,
    lesion_count,
)
from sap_lightning.metrics.functional import LesionDetectionResult, Matching

BODY_CLIP_PERCENTILE = 95.0
"""The coronal MIP is clipped here before Otsu's threshold tells the body from the air: the
bright organs (kidneys, bladder, spleen) cover a few percent of the field and would otherwise
pull the threshold between them and the rest of the body."""
AIR_PERCENTILE = 90.0
"""Percentile of the air's MIP pixels drawn white (the air's noise stays white)."""
BODY_PERCENTILE = 95.0
"""Percentile of the body's MIP pixels drawn black: organs and lesions saturate, as on a
reading screen, and the rest of the body stays grey enough to show the anatomy."""
PANEL_HEIGHT_PX = 900
DPI = 100
LINE_WIDTH_PT = 1.6
"""Lesion outlines: about 2 pixels at :data:`DPI`."""
PANELS: dict[str, int] = {"coronal": 0, "sagittal": 1}
"""Each panel's horizontal world axis (the MIP runs along the other of x and y)."""
_MARGIN = {"left": 30, "gap": 60, "top": 84, "bottom": 34, "legend": 320}
_LETTERS = {"coronal": ("R", "L"), "sagittal": ("A", "P")}


@dataclass(frozen=True)
class Panel:
    """Where one projection lies in the picture and which world mm its edges are.

    ``box`` is ``(top, left, bottom, right)`` in pixels of :attr:`CasePicture.rgb` (edges, not
    pixel centres). The horizontal axis is world x (coronal) or y (sagittal); ``left_mm`` >
    ``right_mm`` because the patient's right (anterior) is on the viewer's left.
    """

    name: str
    box: tuple[float, float, float, float]
    horizontal_axis: int
    left_mm: float
    right_mm: float
    top_mm: float
    bottom_mm: float

    def to_pixel(self, point_mm: np.ndarray | tuple[float, float, float]) -> tuple[float, float]:
        """``(row, column)`` in the picture of a RAS+ world point (mm)."""
        point = np.asarray(point_mm, dtype=np.float64)
        top, left, bottom, right = self.box
        u = (self.left_mm - point[self.horizontal_axis]) / (self.left_mm - self.right_mm)
        v = (self.top_mm - point[2]) / (self.top_mm - self.bottom_mm)
        return float(top + v * (bottom - top)), float(left + u * (right - left))


@dataclass(frozen=True)
class DrawnLesion:
    """One connected component as drawn."""

    kind: str
    """``true positive``, ``false positive``, ``false negative`` or its region's name."""
    colour: Colour
    source: str
    """``prediction`` or ``reference``: the mask it is a component of."""
    voxels: int
    volume_ml: float
    centroid_mm: tuple[float, float, float]
    """Mean of its voxel centres, RAS+ world mm."""
    pixels: dict[str, tuple[float, float]]
    """``(row, column)`` of the centroid's projection on each panel, from the drawing's own
    transform."""
    ringed: bool
    """Drawn as a ring of :data:`MIN_OUTLINE_MM` (a small lesion) rather than its outline."""


@dataclass(frozen=True)
class CasePicture:
    """The picture's pixels and what it shows."""

    rgb: np.ndarray
    """``(height, width, 3)`` uint8: exactly the pixels of the PNG."""
    panels: dict[str, Panel]
    lesions: tuple[DrawnLesion, ...]
    legend: tuple[LegendEntry, ...]
    detection: LesionDetectionResult | None
    """The evaluation's counts, when a prediction and a reference were given."""
    window: tuple[float, float]
    """b1000 values drawn white and black."""
    path: Path | None


def b1000_channel_of(channel_names: Sequence[str]) -> int:
    """The channel a picture shows: ``b1000`` by name, else the second (the paper's order)."""
    names = list(channel_names)
    return names.index("b1000") if "b1000" in names else min(1, len(names) - 1)


def draw_case(
    image: np.ndarray,
    affine: np.ndarray,
    *,
    prediction: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    skeleton: np.ndarray | None = None,
    region_names: Mapping[int, str] | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    b1000_channel: int = CHANNEL_NAMES.index("b1000"),
    connectivity: int = DEFAULT_CONNECTIVITY,
    matching: Matching = "any_overlap",
    panel_height_px: int = PANEL_HEIGHT_PX,
) -> CasePicture:
    """Draw one case's coronal and sagittal b1000 MIPs with its lesions; write ``path`` (PNG).

    ``image`` is the b1000 volume ``(X, Y, Z)`` or the channels ``(C, X, Y, Z)`` (channel
    ``b1000_channel`` is drawn). The masks (any non-zero voxel is lesion, as in the
    evaluation) and ``skeleton`` (label map, 0 background) are on the same grid in the same
    voxel order, which ``affine`` maps to RAS+ mm (any order: axial LPS, coronal, sagittal). ``region_names`` maps skeleton labels to names (default: the
    library's). A prediction alone, or a reference alone: lesions coloured by skeletal region
    ("not assessed" without a skeleton). Both: true / false positive and false negative under
    ``matching``, connected components of ``connectivity`` as ``sap evaluate`` counts them.
    """
    volume = np.asarray(image)
    if volume.ndim == 4:
        volume = volume[b1000_channel]
    if volume.ndim != 3:
        raise ValueError(f"image must be (X, Y, Z) or (C, X, Y, Z), got shape {np.shape(image)}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4 x 4 matrix, got {affine.tolist()}")
    connectivity = check_connectivity(connectivity)
    masks = {"prediction": prediction, "reference": reference, "skeleton": skeleton}
    canonical_masks: dict[str, np.ndarray | None] = {}
    for name, mask in masks.items():
        if mask is not None and np.shape(mask) != volume.shape:
            raise ValueError(f"{name} has shape {np.shape(mask)}, the image {volume.shape}")
        canonical_masks[name] = None if mask is None else to_canonical(np.asarray(mask), affine)[0]
    b1000, canonical = to_canonical(volume.astype(np.float32, copy=False), affine)
    grid = VolumeGrid.of(canonical, b1000.shape)
    content = case_content(
        **canonical_masks,
        affine=canonical,
        grid=grid,
        region_names=region_names,
        connectivity=connectivity,
        matching=matching,
    )

    figure, axes, panels = _layout(grid, panel_height_px)
    window = _draw_projections(b1000, grid, axes)
    if canonical_masks["skeleton"] is not None:
        _draw_skeleton(canonical_masks["skeleton"] > 0, grid, axes)
    rings = _draw_lesions(content.lesions, grid, axes)
    masked = prediction is not None or reference is not None
    _draw_legend(figure, content, _notes(content, window, masked))
    if title:
        figure.text(
            _MARGIN["left"] / figure.bbox.width,
            1 - 8 / figure.bbox.height,
            title,
            ha="left",
            va="top",
            fontsize=13,
            weight="bold",
        )
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    height = rgb.shape[0]
    placed = {}
    for name, ax in axes.items():
        x0, y0, x1, y1 = ax.get_window_extent().extents
        placed[name] = Panel(name, (height - y1, x0, height - y0, x1), *panels[name])
    drawn = tuple(
        _drawn(lesion, grid, axes, height, ringed)
        for lesion, ringed in zip(content.lesions, rings, strict=True)
    )
    if path is not None:
        path = Path(path)
        with atomic_path(path) as tmp:
            imsave(tmp, rgb, format="png")
    legend = tuple(content.legend)
    return CasePicture(rgb, placed, drawn, legend, content.detection, window, path)


def mip_window(mip: np.ndarray) -> tuple[float, float]:
    """``(white, black)``: the air's :data:`AIR_PERCENTILE` and the body's
    :data:`BODY_PERCENTILE` of a MIP, body and air told apart by Otsu's threshold of the MIP
    clipped at its :data:`BODY_CLIP_PERCENTILE`."""
    values = mip[np.isfinite(mip)].astype(np.float32)
    if values.size == 0:
        return 0.0, 1.0
    clipped = np.minimum(values, np.percentile(values, BODY_CLIP_PERCENTILE))
    inside = clipped > otsu_threshold(clipped[None]) if np.ptp(clipped) > 0 else None
    if inside is None or inside.all() or not inside.any():
        low, high = (float(v) for v in np.percentile(values, (1.0, BODY_PERCENTILE)))
    else:
        low = float(np.percentile(values[~inside], AIR_PERCENTILE))
        high = float(np.percentile(values[inside], BODY_PERCENTILE))
    return (low, high) if high > low else (low, low + 1.0)


# ------------------------------------------------------------------------------ the figure


def _layout(
    grid: VolumeGrid, panel_height_px: int
) -> tuple[Figure, dict[str, Axes], dict[str, tuple[int, float, float, float, float]]]:
    """A figure with one axes per panel, each in whole pixels and sized to its extent in mm
    (the same mm per pixel in both), and each panel's (axis, left, right, top, bottom mm)."""
    z0, z1 = grid.edges(2)
    mm_per_px = (z1 - z0) / panel_height_px
    limits = {}
    widths = {}
    for name, axis in PANELS.items():
        low, high = grid.edges(axis)
        limits[name] = (axis, high, low, z1, z0)  # patient's right / anterior on the left
        widths[name] = max(1, round((high - low) / mm_per_px))
    m = _MARGIN
    width = m["left"] + sum(widths.values()) + m["gap"] * (len(widths) - 1) + m["legend"]
    height = m["top"] + panel_height_px + m["bottom"]
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    axes = {}
    left = m["left"]
    font = {"fontsize": 13, "weight": "bold", "color": "0.15"}
    for name in PANELS:
        position = (
            left / width,
            m["bottom"] / height,
            widths[name] / width,
            panel_height_px / height,
        )
        ax = figure.add_axes(position)
        ax.set_axis_off()
        first, second = _LETTERS[name]
        left_of = offset_copy(ax.transAxes, figure, x=-5, units="dots")
        right_of = offset_copy(ax.transAxes, figure, x=5, units="dots")
        ax.text(0.0, 0.5, first, transform=left_of, ha="right", va="center", **font)
        ax.text(1.0, 0.5, second, transform=right_of, ha="left", va="center", **font)
        ax.text(0.5, 1.0, "S", transform=ax.transAxes, ha="center", va="bottom", **font)
        ax.text(0.5, 0.0, "I", transform=ax.transAxes, ha="center", va="top", **font)
        ax.text(
            0.5,
            1.0,
            f"{name} MIP",
            transform=offset_copy(ax.transAxes, figure, y=24, units="dots"),
            ha="center",
            va="bottom",
            fontsize=11,
        )
        axes[name] = ax
        left += widths[name] + m["gap"]
    return figure, axes, limits


def _draw_projections(
    b1000: np.ndarray, grid: VolumeGrid, axes: dict[str, Axes]
) -> tuple[float, float]:
    mips = {"coronal": b1000.max(axis=1), "sagittal": b1000.max(axis=0)}  # (X, Z), (Y, Z)
    window = mip_window(mips["coronal"])
    z0, z1 = grid.edges(2)
    for name, axis in PANELS.items():
        low, high = grid.edges(axis)
        axes[name].imshow(
            mips[name].T,
            cmap="gray_r",
            vmin=window[0],
            vmax=window[1],
            origin="lower",
            extent=(low, high, z0, z1),
            interpolation="bilinear",
            aspect="auto",
        )
        axes[name].set_xlim(high, low)  # the patient's right / anterior on the viewer's left
        axes[name].set_ylim(z0, z1)
    return window


def _outline(
    footprint: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    spacing: tuple[float, float],
    margin_mm: float,
) -> list[np.ndarray]:
    """Contour lines (world mm) around a 2D footprint whose pixel centres are ``u`` x ``v``,
    ``margin_mm`` outside it so the outline does not cover what it marks."""
    pad = [int(np.ceil(margin_mm / step)) + 1 for step in spacing]
    padded = np.pad(footprint, [(pad[0], pad[0]), (pad[1], pad[1])])
    if margin_mm > 0:
        padded = ndimage.distance_transform_edt(~padded, sampling=spacing) <= margin_mm
    uu = u[0] + (np.arange(padded.shape[0]) - pad[0]) * spacing[0]
    vv = v[0] + (np.arange(padded.shape[1]) - pad[1]) * spacing[1]
    field = padded.T.astype(np.float64)
    generator = contourpy.contour_generator(uu, vv, field, line_type="Separate")
    return [line for line in generator.lines(0.5) if len(line) > 1]


def _draw_skeleton(bone: np.ndarray, grid: VolumeGrid, axes: dict[str, Axes]) -> None:
    colour = np.array(SKELETON_COLOUR) / 255
    for name, axis in PANELS.items():
        footprint = bone.any(axis=1 - axis)
        u, v = grid.centres(axis, 0, grid.shape[axis]), grid.centres(2, 0, grid.shape[2])
        lines = _outline(footprint, u, v, (grid.spacing[axis], grid.spacing[2]), 0.0)
        axes[name].add_collection(LineCollection(lines, colors=[colour], linewidths=0.6, zorder=2))


def _draw_lesions(
    lesions: list[LesionToDraw], grid: VolumeGrid, axes: dict[str, Axes]
) -> list[bool]:
    """Outline every lesion on both panels; returns whether each was ringed instead."""
    lines: dict[tuple[str, Colour], list[np.ndarray]] = {}
    rings = []
    for lesion in lesions:
        crop = lesion.labels[lesion.box] == lesion.label
        starts = [s.start for s in lesion.box]
        extent_mm = [n * s for n, s in zip(crop.shape, grid.spacing, strict=True)]
        ringed = max(extent_mm) + 2 * OUTLINE_MARGIN_MM < MIN_OUTLINE_MM
        colour = np.array(lesion.colour) / 255
        for name, axis in PANELS.items():
            if ringed:
                centre = (lesion.centroid_mm[axis], lesion.centroid_mm[2])
                ring = Circle(centre, MIN_OUTLINE_MM / 2, fill=False, edgecolor=colour)
                ring.set(linewidth=LINE_WIDTH_PT, zorder=4)
                axes[name].add_patch(ring)
                continue
            u = grid.centres(axis, starts[axis], starts[axis] + crop.shape[axis])
            v = grid.centres(2, starts[2], starts[2] + crop.shape[2])
            spacing = (grid.spacing[axis], grid.spacing[2])
            outline = _outline(crop.any(axis=1 - axis), u, v, spacing, OUTLINE_MARGIN_MM)
            lines.setdefault((name, lesion.colour), []).extend(outline)
        rings.append(ringed)
    for (name, colour_key), segments in lines.items():
        collection = LineCollection(segments, colors=[np.array(colour_key) / 255], zorder=3)
        collection.set_linewidth(LINE_WIDTH_PT)
        axes[name].add_collection(collection)
    return rings


def _notes(content: Content, window: tuple[float, float], masked: bool) -> list[str]:
    """Lines under the legend: the total burden (by region) and the grey window."""
    notes = []
    if masked and content.detection is None:
        total = sum(entry.volume_ml for entry in content.legend)
        notes.append(f"total: {lesion_count(len(content.lesions))}, {total:.2f} mL")
    notes.append(f"inverted b1000, window {window[0]:.4g}-{window[1]:.4g}")
    return notes


def _draw_legend(figure: Figure, content: Content, notes: list[str]) -> None:
    """The legend right of the panels; an entry without lesions gets no swatch, so a lesion
    colour appears only where a lesion of its kind is drawn."""
    handles, labels = [], []
    for entry in content.legend:
        colour = np.array(entry.colour) / 255
        handles.append(
            Line2D([], [], color=colour, linewidth=3, linestyle="-" if entry.count else "none")
        )
        labels.append(entry.label)
    handles += [Line2D([], [], linestyle="none") for _ in notes]
    labels += notes
    figure.legend(
        handles,
        labels,
        loc="upper left",
        bbox_to_anchor=(
            1 - (_MARGIN["legend"] - 16) / figure.bbox.width,
            1 - _MARGIN["top"] / figure.bbox.height,
        ),
        frameon=False,
        title=content.heading,
        alignment="left",
        fontsize=10,
        title_fontsize=11,
        handlelength=1.6,
    )


def _drawn(
    lesion: LesionToDraw, grid: VolumeGrid, axes: dict[str, Axes], height: int, ringed: bool
) -> DrawnLesion:
    pixels = {}
    for name, axis in PANELS.items():
        x, y = axes[name].transData.transform((lesion.centroid_mm[axis], lesion.centroid_mm[2]))
        pixels[name] = (float(height - y), float(x))
    return DrawnLesion(
        kind=lesion.kind,
        colour=lesion.colour,
        source=lesion.source,
        voxels=lesion.voxels,
        volume_ml=lesion.voxels * voxel_volume_ml(grid.spacing),
        centroid_mm=tuple(float(c) for c in lesion.centroid_mm),  # type: ignore[arg-type]
        pixels=pixels,
        ringed=ringed,
    )

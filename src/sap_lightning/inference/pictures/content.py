"""What a case picture shows: its lesions, the kind and colour of each, and the legend.

Kinds come from the library's own functions, never re-derived here: the evaluation's matching
(:func:`~sap_lightning.metrics.functional.match_lesions`) for true / false positives and
false negatives, the burden report (:func:`~sap_lightning.inference.burden.lesion_table`) for
skeletal regions, so a picture's counts are those of ``sap evaluate`` and ``sap predict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sap_lightning.core.lesions import connected_components, voxel_volume_ml
from sap_lightning.dataset.layout import SKELETON_LABELS, spacing_of
from sap_lightning.inference.burden import NOT_ASSESSED, OTHER_BONE, exam_summary, lesion_table
from sap_lightning.metrics.functional import LesionDetectionResult, Matching, match_lesions

Colour = tuple[int, int, int]

TRUE_POSITIVE_COLOUR: Colour = (0, 158, 115)
"""Okabe-Ito bluish green: a predicted component touching a reference lesion."""
FALSE_POSITIVE_COLOUR: Colour = (213, 94, 0)
"""Okabe-Ito vermillion: a predicted component touching no reference lesion."""
FALSE_NEGATIVE_COLOUR: Colour = (0, 114, 178)
"""Okabe-Ito blue: a reference lesion no predicted component touches."""
REGION_COLOURS: dict[int, Colour] = {
    1: (31, 119, 180),  # cervical spine
    2: (255, 127, 14),  # thoracic spine
    3: (44, 160, 44),  # lumbar spine
    4: (214, 39, 40),  # pelvis
    5: (148, 103, 189),  # femurs
    6: (127, 24, 13),  # humeri
    7: (227, 119, 194),  # scapulae
    8: (188, 189, 34),  # clavicles
    9: (23, 190, 207),  # sternum
}
"""Lesion colour per skeleton label value: tab10 without its grey, and a reddish brown for its
brown, which the skeleton's tan outline blended into grey can come close to."""
OTHER_BONE_COLOUR: Colour = (230, 0, 230)
"""Lesions overlapping no labelled region (ribs, skull; the burden report's "other bone")."""
NOT_ASSESSED_COLOUR: Colour = (120, 0, 200)
"""Lesions when no skeleton map was given."""
LESION_COLOURS: tuple[Colour, ...] = (
    TRUE_POSITIVE_COLOUR,
    FALSE_POSITIVE_COLOUR,
    FALSE_NEGATIVE_COLOUR,
    *REGION_COLOURS.values(),
    OTHER_BONE_COLOUR,
    NOT_ASSESSED_COLOUR,
)
"""Every colour a lesion can be drawn in (none of them grey, so tests can find them)."""
SKELETON_COLOUR: Colour = (185, 160, 110)
"""The skeleton's projected silhouette: a thin tan line, context only (far from every lesion
colour, so tests and readers never take it for a lesion)."""

TRUE_POSITIVE, FALSE_POSITIVE, FALSE_NEGATIVE = "true positive", "false positive", "false negative"
MIN_OUTLINE_MM = 14.0
"""A lesion whose outline would be smaller than this on both panels gets a ring of this
diameter instead (a 0.2 mL lesion is a few pixels on a whole-body panel; its own outline would
hide it)."""
OUTLINE_MARGIN_MM = 3.0
"""Outlines run this far outside a lesion's footprint, so the lesion's own signal shows."""


@dataclass(frozen=True)
class VolumeGrid:
    """The canonical (RAS+) volume's geometry: where each voxel's centre is along each world
    axis (mm). Exact for the usual axis-aligned grids; an oblique grid is drawn on its voxel
    grid (no resampling), placed by its centre."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    low: np.ndarray
    """World coordinate of the lower edge of the volume along each axis."""

    @classmethod
    def of(cls, affine: np.ndarray, shape: tuple[int, ...]) -> VolumeGrid:
        spacing = spacing_of(affine)
        size = np.asarray(shape[-3:], dtype=np.float64)
        centre = affine[:3, :3] @ ((size - 1) / 2) + affine[:3, 3]
        low = centre - size * np.asarray(spacing) / 2
        return cls(tuple(int(s) for s in shape[-3:]), spacing, low)  # type: ignore[arg-type]

    def centres(self, axis: int, start: int, stop: int) -> np.ndarray:
        return self.low[axis] + (np.arange(start, stop) + 0.5) * self.spacing[axis]

    def edges(self, axis: int) -> tuple[float, float]:
        return float(self.low[axis]), float(self.low[axis] + self.shape[axis] * self.spacing[axis])

    def world(self, ijk: np.ndarray) -> np.ndarray:
        return self.low + (np.asarray(ijk, dtype=np.float64) + 0.5) * np.asarray(self.spacing)


@dataclass(frozen=True)
class LesionToDraw:
    """One connected component and how to draw it."""

    kind: str
    colour: Colour
    source: str
    """``prediction`` or ``reference``."""
    labels: np.ndarray
    """The component label volume it is one id of (shared, not copied)."""
    label: int
    box: tuple[slice, slice, slice]
    voxels: int
    centroid_mm: np.ndarray


@dataclass(frozen=True)
class LegendEntry:
    """One legend line: what ``count`` lesions of ``colour`` are and their total volume."""

    label: str
    colour: Colour
    count: int
    volume_ml: float


@dataclass(frozen=True)
class Content:
    lesions: list[LesionToDraw]
    legend: list[LegendEntry]
    heading: str
    detection: LesionDetectionResult | None


def case_content(
    prediction: np.ndarray | None,
    reference: np.ndarray | None,
    skeleton: np.ndarray | None,
    affine: np.ndarray,
    grid: VolumeGrid,
    region_names: Mapping[int, str] | None,
    connectivity: int,
    matching: Matching,
) -> Content:
    """The lesions of canonical masks: matched when both are given, by region otherwise."""
    if prediction is not None and reference is not None:
        return _matched(prediction, reference, grid, connectivity, matching)
    source, mask = (
        ("prediction", prediction) if prediction is not None else ("reference", reference)
    )
    if mask is None:
        return Content([], [], "b1000 MIP", None)
    names = _region_names(region_names)
    lesions, legend = _by_region(mask > 0, skeleton, affine, grid, names, connectivity, source)
    heading = f"{'predicted' if source == 'prediction' else 'reference'} lesions by region"
    return Content(lesions, legend, heading, None)


def lesion_count(count: int) -> str:
    return f"{count} lesion" if count == 1 else f"{count} lesions"


def _region_names(region_names: Mapping[int, str] | None) -> dict[int, str]:
    if region_names is None:
        return {value: name for name, value in SKELETON_LABELS.items() if value}
    return {int(k): str(v) for k, v in region_names.items() if int(k)}


def _components(
    labels: np.ndarray, grid: VolumeGrid, kinds: Mapping[int, tuple[str, Colour]], source: str
) -> list[LesionToDraw]:
    """One :class:`LesionToDraw` per id in ``kinds`` present in ``labels``."""
    out = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or label not in kinds:
            continue
        inside = labels[box] == label
        ijk = np.argwhere(inside).mean(axis=0) + np.array([s.start for s in box])
        kind, colour = kinds[label]
        voxels = int(inside.sum())
        out.append(LesionToDraw(kind, colour, source, labels, label, box, voxels, grid.world(ijk)))
    return out


def _matched(
    prediction: np.ndarray,
    reference: np.ndarray,
    grid: VolumeGrid,
    connectivity: int,
    matching: Matching,
) -> Content:
    match = match_lesions(prediction, reference, connectivity, matching)  # type: ignore[arg-type]
    detection = LesionDetectionResult(
        n_gt=len(match.gt_detected),
        n_pred=len(match.pred_matched),
        n_detected=int(match.gt_detected.sum()),
        n_pred_matched=int(match.pred_matched.sum()),
        matching=matching,
        min_volume_ml=0.0,
    )
    tp, fp = (TRUE_POSITIVE, TRUE_POSITIVE_COLOUR), (FALSE_POSITIVE, FALSE_POSITIVE_COLOUR)
    pred_kinds = {i + 1: tp if hit else fp for i, hit in enumerate(match.pred_matched)}
    missed = {
        i + 1: (FALSE_NEGATIVE, FALSE_NEGATIVE_COLOUR) for i in np.flatnonzero(~match.gt_detected)
    }
    lesions = _components(match.pred_labels, grid, pred_kinds, "prediction")
    lesions += _components(match.gt_labels, grid, missed, "reference")
    ml = voxel_volume_ml(grid.spacing)
    volume = {
        kind: sum(lesion.voxels for lesion in lesions if lesion.kind == kind) * ml
        for kind in (TRUE_POSITIVE, FALSE_POSITIVE, FALSE_NEGATIVE)
    }
    found = f"{detection.n_detected} of {lesion_count(detection.n_gt)} found"
    if detection.n_pred_matched != detection.n_detected:  # split or merged lesions
        found += f" by {detection.n_pred_matched} components"
    legend = [
        LegendEntry(
            f"{TRUE_POSITIVE}: {found}",
            TRUE_POSITIVE_COLOUR,
            detection.n_detected,
            volume[TRUE_POSITIVE],
        ),
        LegendEntry(
            f"{FALSE_POSITIVE}: {detection.n_false_positive}",
            FALSE_POSITIVE_COLOUR,
            detection.n_false_positive,
            volume[FALSE_POSITIVE],
        ),
        LegendEntry(
            f"{FALSE_NEGATIVE}: {detection.n_missed} missed",
            FALSE_NEGATIVE_COLOUR,
            detection.n_missed,
            volume[FALSE_NEGATIVE],
        ),
    ]
    return Content(lesions, legend, "prediction against reference", detection)


def _by_region(
    mask: np.ndarray,
    skeleton: np.ndarray | None,
    affine: np.ndarray,
    grid: VolumeGrid,
    names: dict[int, str],
    connectivity: int,
    source: str,
) -> tuple[list[LesionToDraw], list[LegendEntry]]:
    table = lesion_table(
        mask,
        mask.astype(np.float32),
        affine,
        skeleton=skeleton,
        region_names=names,
        connectivity=connectivity,
    )
    colour_of = {
        name: REGION_COLOURS.get(label, OTHER_BONE_COLOUR) for label, name in names.items()
    }
    colour_of.update({OTHER_BONE: OTHER_BONE_COLOUR, NOT_ASSESSED: NOT_ASSESSED_COLOUR})
    labels, _ = connected_components(mask, connectivity)  # the ids of the table's lesion_id
    kinds = {
        int(row.lesion_id): (row.region, colour_of.get(row.region, OTHER_BONE_COLOUR))
        for row in table.itertuples()
    }
    lesions = _components(labels, grid, kinds, source)
    per_region = exam_summary(table)["per_region"]
    order = [*names.values(), OTHER_BONE, NOT_ASSESSED]  # anatomical order, head to feet

    def entry(region: str) -> LegendEntry:
        count, volume = per_region[region]["lesions"], per_region[region]["volume_ml"]
        label = f"{region.replace('_', ' ')}: {lesion_count(count)}, {volume:.2f} mL"
        return LegendEntry(label, colour_of.get(region, OTHER_BONE_COLOUR), count, volume)

    regions = sorted(per_region, key=lambda r: order.index(r) if r in order else len(order))
    return lesions, [entry(region) for region in regions]

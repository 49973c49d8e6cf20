"""Metastatic burden from a predicted mask: a lesion table and an exam summary by skeletal region.

Response assessment needs every lesion found and measured; radiologists read it by region
(spine levels, pelvis, long bones). The table lists each predicted lesion with its volume,
centroid in scanner coordinates, probability and region; the summary counts lesions and volume
overall and per region.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import ndimage

from sap_lightning.core.lesions import component_boxes, connected_components, voxel_volume_ml
from sap_lightning.core.protocol import DEFAULT_CONNECTIVITY
from sap_lightning.dataset.layout import spacing_of

OTHER_BONE = "other bone"
"""Region of a lesion that overlaps no labelled skeletal region (ribs, skull, unlabelled bone)."""
NOT_ASSESSED = "not assessed"
"""Region when no skeleton map was given."""

TABLE_COLUMNS = [
    "lesion_id",
    "voxels",
    "volume_ml",
    "centroid_x_mm",
    "centroid_y_mm",
    "centroid_z_mm",
    "mean_probability",
    "max_probability",
    "region",
]


def relabel_skeleton_by_component(skeleton: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Give every connected bone component the class most of its voxels have.

    A network can label the two ends of one femur differently; the authors (and this library)
    clean the skeleton map by a majority vote per connected component of the foreground.
    """
    skeleton = np.asarray(skeleton)
    components, n_components = connected_components(skeleton, connectivity)
    if n_components == 0:
        return skeleton.copy()
    n_classes = int(skeleton.max()) + 1
    # One joint histogram over (component, class) instead of a Python loop over components.
    joint = np.bincount(
        components.ravel().astype(np.int64) * n_classes + skeleton.ravel().astype(np.int64),
        minlength=(n_components + 1) * n_classes,
    ).reshape(n_components + 1, n_classes)
    joint[:, 0] = 0  # background never wins inside a bone component
    majority = joint.argmax(axis=1).astype(skeleton.dtype)
    majority[0] = 0
    return majority[components]


def _voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def lesion_table(
    mask: np.ndarray,
    probability: np.ndarray,
    affine: np.ndarray,
    *,
    skeleton: np.ndarray | None = None,
    region_names: Mapping[int, str] | None = None,
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> pd.DataFrame:
    """One row per connected component of ``mask`` (columns: :data:`TABLE_COLUMNS`).

    Volumes come from the affine's voxel volume; centroids are in the affine's world (mm)
    coordinates. The region is the skeletal class that most lesion voxels (and their one-voxel
    neighbourhood, since a lesion often sits on a bone's border) carry in ``skeleton``;
    :data:`OTHER_BONE` when none, :data:`NOT_ASSESSED` without a skeleton map.
    """
    mask = np.asarray(mask) > 0
    probability = np.asarray(probability, dtype=np.float32)
    if probability.shape != mask.shape:
        raise ValueError(f"probability shape {probability.shape} differs from mask {mask.shape}")
    if skeleton is not None and np.asarray(skeleton).shape != mask.shape:
        raise ValueError(f"skeleton shape {np.asarray(skeleton).shape} differs from {mask.shape}")
    voxel_ml = voxel_volume_ml(spacing_of(affine))
    labels, count = connected_components(mask, connectivity)
    rows = []
    for lesion_id, box in enumerate(component_boxes(labels, count), start=1):
        inside = labels[box] == lesion_id
        ijk = np.argwhere(inside) + np.array([s.start for s in box])
        probs = probability[box][inside]
        region = NOT_ASSESSED
        if skeleton is not None:
            region = _region_of(inside, box, np.asarray(skeleton), region_names)
        centroid = _voxel_to_world(affine, ijk.mean(axis=0))
        rows.append(
            {
                "lesion_id": lesion_id,
                "voxels": int(inside.sum()),
                "volume_ml": float(inside.sum() * voxel_ml),
                "centroid_x_mm": float(centroid[0]),
                "centroid_y_mm": float(centroid[1]),
                "centroid_z_mm": float(centroid[2]),
                "mean_probability": float(probs.mean()),
                "max_probability": float(probs.max()),
                "region": region,
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _region_of(
    inside: np.ndarray,
    box: tuple[slice, ...],
    skeleton: np.ndarray,
    region_names: Mapping[int, str] | None,
) -> str:
    # Grow the crop by one voxel so the neighbourhood of a border lesion is seen.
    grown = tuple(
        slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, skeleton.shape)
    )
    pad = [(s.start - g.start, g.stop - s.stop) for s, g in zip(box, grown)]
    near = ndimage.binary_dilation(np.pad(inside, pad))
    classes = skeleton[grown][near]
    classes = classes[classes > 0].astype(np.int64)
    if classes.size == 0:
        return OTHER_BONE
    label = int(np.bincount(classes).argmax())
    return (region_names or {}).get(label, str(label))


def exam_summary(table: pd.DataFrame) -> dict:
    """Lesion count and total volume, overall and per region (plain types, JSON-ready)."""
    per_region = {
        str(region): {"lesions": len(group), "volume_ml": float(group["volume_ml"].sum())}
        for region, group in table.groupby("region", sort=True)
    }
    return {
        "lesions": len(table),
        "total_volume_ml": float(table["volume_ml"].sum()) if len(table) else 0.0,
        "per_region": per_region,
    }

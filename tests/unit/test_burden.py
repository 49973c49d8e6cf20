"""Lesion table, exam summary and skeleton clean-up against hand-built volumes."""

from __future__ import annotations

import numpy as np
import pytest

from sap_lightning.dataset.layout import SKELETON_LABELS
from sap_lightning.inference.burden import (
    NOT_ASSESSED,
    OTHER_BONE,
    exam_summary,
    lesion_table,
    relabel_skeleton_by_component,
)

REGION_NAMES = {v: k for k, v in SKELETON_LABELS.items()}
# Anisotropic spacing and a shifted origin, so axis-order and offset mistakes show.
AFFINE = np.array([[1.5, 0, 0, -100.0], [0, 2.0, 0, 20.0], [0, 0, 5.0, 300.0], [0, 0, 0, 1.0]])
VOXEL_ML = 1.5 * 2.0 * 5.0 / 1000.0


@pytest.fixture
def exam() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shape = (40, 30, 20)
    mask = np.zeros(shape, np.uint8)
    prob = np.zeros(shape, np.float32)
    skeleton = np.zeros(shape, np.uint8)
    skeleton[0:20, 0:15, 0:10] = SKELETON_LABELS["lumbar_spine"]
    skeleton[20:40, 0:15, 0:10] = SKELETON_LABELS["pelvis"]
    mask[2:5, 2:4, 2:3] = 1  # 6 voxels in the lumbar spine
    prob[2:5, 2:4, 2:3] = np.linspace(0.6, 0.9, 6, dtype=np.float32).reshape(3, 2, 1)
    mask[30:32, 5:7, 5:7] = 1  # 8 voxels in the pelvis
    prob[30:32, 5:7, 5:7] = 0.7
    mask[10, 25, 15] = 1  # 1 voxel outside any labelled region (a rib, say)
    prob[10, 25, 15] = 0.55
    return mask, prob, skeleton


def test_table_counts_volumes_centroids_and_regions(exam) -> None:
    mask, prob, skeleton = exam
    table = lesion_table(mask, prob, AFFINE, skeleton=skeleton, region_names=REGION_NAMES)
    assert len(table) == 3
    by_voxels = table.set_index("voxels")
    assert by_voxels.loc[6, "region"] == "lumbar_spine"
    assert by_voxels.loc[8, "region"] == "pelvis"
    assert by_voxels.loc[1, "region"] == OTHER_BONE
    assert by_voxels.loc[6, "volume_ml"] == pytest.approx(6 * VOXEL_ML)
    # centroid of voxels x 2..4, y 2..3, z 2 -> (3, 2.5, 2) in voxels, through the affine
    row = by_voxels.loc[6]
    assert (row.centroid_x_mm, row.centroid_y_mm, row.centroid_z_mm) == pytest.approx(
        (3 * 1.5 - 100.0, 2.5 * 2.0 + 20.0, 2 * 5.0 + 300.0)
    )
    assert row.max_probability == pytest.approx(0.9)
    assert row.mean_probability == pytest.approx(0.75)
    # The table is consistent with the mask it describes.
    assert table["voxels"].sum() == mask.sum()


def test_without_skeleton_regions_are_not_assessed(exam) -> None:
    mask, prob, _ = exam
    table = lesion_table(mask, prob, AFFINE)
    assert set(table["region"]) == {NOT_ASSESSED}


def test_border_lesion_takes_the_neighbouring_region() -> None:
    skeleton = np.zeros((10, 10, 10), np.uint8)
    skeleton[:5] = SKELETON_LABELS["sternum"]
    mask = np.zeros_like(skeleton)
    mask[5, 5, 5] = 1  # just outside the sternum, touching it
    table = lesion_table(
        mask, mask.astype(np.float32), np.eye(4), skeleton=skeleton, region_names=REGION_NAMES
    )
    assert table.loc[0, "region"] == "sternum"


def test_summary_adds_up(exam) -> None:
    mask, prob, skeleton = exam
    summary = exam_summary(
        lesion_table(mask, prob, AFFINE, skeleton=skeleton, region_names=REGION_NAMES)
    )
    assert summary["lesions"] == 3
    assert summary["total_volume_ml"] == pytest.approx(15 * VOXEL_ML)
    assert summary["per_region"]["pelvis"] == {
        "lesions": 1,
        "volume_ml": pytest.approx(8 * VOXEL_ML),
    }
    assert sum(r["lesions"] for r in summary["per_region"].values()) == 3


def test_empty_mask_gives_empty_table_and_zero_burden() -> None:
    mask = np.zeros((5, 5, 5), np.uint8)
    table = lesion_table(mask, mask.astype(np.float32), np.eye(4))
    assert len(table) == 0
    assert exam_summary(table) == {"lesions": 0, "total_volume_ml": 0.0, "per_region": {}}


def test_relabel_gives_each_component_its_majority_class() -> None:
    skeleton = np.zeros((20, 10, 10), np.uint8)
    skeleton[0:8, 2:5, 2:5] = 5  # a femur...
    skeleton[8:10, 2:5, 2:5] = 6  # ...whose end was labelled humerus
    skeleton[15:18, 2:5, 2:5] = 6  # a separate humerus stays a humerus
    cleaned = relabel_skeleton_by_component(skeleton)
    assert (cleaned[0:10, 2:5, 2:5] == 5).all()
    assert (cleaned[15:18, 2:5, 2:5] == 6).all()
    assert (cleaned[skeleton == 0] == 0).all()

"""nnU-Net's ``ignore`` label: the dataset check, the cache, patch centres, and the metric rule
(ignored reference voxels are background on both sides before anything is counted).

Expectations come from the label files read with nibabel and scipy, and from worked values;
the guard test shows that declaring the label changes no draw while no voxel carries it.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from sap_lightning.batches.planners import (
    BodyUniformPlanner,
    ClassBalancedPlanner,
    InstanceBalancedPlanner,
)
from sap_lightning.batches.store import CaseStore
from sap_lightning.cache import open_cache, preprocess_dataset
from sap_lightning.cache.reader import IGNORE_VALUE
from sap_lightning.config import load_config
from sap_lightning.dataset.spec import read_spec
from sap_lightning.dataset.validate import check_dataset
from sap_lightning.evaluation.predictions import IGNORE_RULE, evaluate_predictions
from sap_lightning.modules import build_module
from tests.datasets import affine_for, save, write_tiny_dataset
from tests.tiny import TINY_CONFIG

SHAPE = (24, 20, 16)
IGNORED_FROM_X = 12
"""Every tiny case below has its voxels at x >= 12 labelled ``ignore``."""


def _declare(root: Path, labels: dict[str, int]) -> Path:
    spec = json.loads((root / "dataset.json").read_text())
    spec["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def _ignore_half(root: Path, value: int) -> Path:
    """Label the voxels at x >= 12 of every case ``value`` (lesions there are overwritten)."""
    for path in sorted((root / "labelsTr").iterdir()):
        image = nib.load(path)
        label = np.asarray(image.dataobj).astype(np.uint8)
        label[IGNORED_FROM_X:] = value
        save(path, label, image.affine)
    return root


@pytest.fixture(scope="module")
def ignored_lesions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_tiny_dataset(
        tmp_path_factory.mktemp("ignore") / "ds", n_cases=4, shape=SHAPE, lesions_per_case=6
    )
    return _declare(_ignore_half(root, 2), {"background": 0, "lesion": 1, "ignore": 2})


@pytest.fixture(scope="module")
def ignored_store(ignored_lesions: Path, tmp_path_factory: pytest.TempPathFactory) -> CaseStore:
    cache = tmp_path_factory.mktemp("ignore_cache")
    preprocess_dataset(ignored_lesions, cache)
    return CaseStore(open_cache(cache))


# --------------------------------------------------------------------------- dataset.json


def test_the_ignore_label_is_accepted_with_the_highest_value_only(ignored_lesions: Path) -> None:
    assert check_dataset(ignored_lesions, use_cache=False) == []
    spec, _ = read_spec(ignored_lesions)
    assert spec is not None and (spec.labels, spec.ignore_value) == (
        {"background": 0, "lesion": 1},
        2,
    )
    _declare(ignored_lesions, {"background": 0, "ignore": 1, "lesion": 2})
    try:
        (problem,) = check_dataset(ignored_lesions, use_cache=False)
    finally:
        _declare(ignored_lesions, {"background": 0, "lesion": 1, "ignore": 2})
    assert str(problem) == (
        "dataset: dataset.json: label 'ignore' must have the highest value, 2 (nnU-Net's rule), "
        "got 1"
    )


# --------------------------------------------------------------------------- the cache


def test_the_cache_keeps_ignored_voxels_apart(ignored_lesions: Path, ignored_store) -> None:
    cache = ignored_store.cache
    assert cache.ignore_value == IGNORE_VALUE and cache.labels == {"background": 0, "lesion": 1}
    for case_id in cache.case_ids:
        raw = np.asarray(nib.load(ignored_lesions / f"labelsTr/{case_id}.nii.gz").dataobj)
        case = cache.load(case_id)
        expected = np.where(raw == 2, IGNORE_VALUE, raw)
        np.testing.assert_array_equal(case.label, expected)
        components, count = ndimage.label(raw == 1)
        boxes = {tuple(s.start for s in box) for box in ndimage.find_objects(components)}
        assert count == len(case.lesions) and boxes == {c.bbox[:3] for c in case.lesions}
        assert all(c.bbox[3] <= IGNORED_FROM_X for c in case.lesions)
        assert (case.class_locations[1][:, 0] < IGNORED_FROM_X).all()


def test_a_skeleton_cache_keeps_its_classes_and_the_ignored_voxels(tmp_path: Path) -> None:
    root = write_tiny_dataset(
        tmp_path / "skeleton", n_cases=2, task="skeleton", shape=SHAPE, lesions_per_case=9
    )
    labels = json.loads((root / "dataset.json").read_text())["labels"]
    _declare(_ignore_half(root, 10), {**labels, "ignore": 10})
    preprocess_dataset(root, tmp_path / "cache")
    cache = open_cache(tmp_path / "cache")
    assert (cache.task, cache.labels, cache.ignore_value) == ("skeleton", labels, IGNORE_VALUE)
    case = cache.load("case000")
    assert (case.label[IGNORED_FROM_X:] == IGNORE_VALUE).all()
    assert case.label[:IGNORED_FROM_X].max() <= 9
    assert all((v[:, 0] < IGNORED_FROM_X).all() for v in case.class_locations.values())


# --------------------------------------------------------------------------- patch centres


def _centres(tasks) -> list[tuple[str, tuple[int, int, int]]]:
    """The one-voxel focus of every body-centred task (the drawn centre)."""
    return [(t.case_id, t.focus[:3]) for t in tasks if t.kind in ("negative", "body")]


def test_no_patch_centre_lies_on_an_ignored_voxel(ignored_store: CaseStore) -> None:
    ids = ignored_store.cache.case_ids
    planners = [
        InstanceBalancedPlanner(ignored_store, ids, (8, 8, 8), seed=0),
        ClassBalancedPlanner(ignored_store, ids, (8, 8, 8), 0, count=120, class_fraction=0.5),
        BodyUniformPlanner(ignored_store, ids, (8, 8, 8), seed=0, count=120),
    ]
    for planner in planners:
        for epoch in range(3):
            tasks = planner.plan(epoch)
            centres = _centres(tasks)
            assert len(centres) >= 10, type(planner).__name__
            for case_id, centre in centres:
                assert centre[0] < IGNORED_FROM_X, (type(planner).__name__, case_id, centre)
                assert ignored_store.get(case_id).body_mask[centre]
            for task in tasks:  # lesion boxes and class voxels: annotated voxels only
                if task.kind in ("positive", "class"):
                    assert task.focus[3] <= IGNORED_FROM_X


def test_declaring_the_label_without_ignored_voxels_changes_no_draw(tmp_path: Path) -> None:
    """The guard: the same dataset with and without ``ignore`` declared (no voxel carries it)
    gives the same cache arrays and the same plans, patch for patch."""
    stores = []
    for declared in (False, True):
        root = write_tiny_dataset(tmp_path / f"ds{declared}", n_cases=4, shape=SHAPE)
        if declared:
            _declare(root, {"background": 0, "lesion": 1, "ignore": 2})
        preprocess_dataset(root, tmp_path / f"cache{declared}")
        stores.append(CaseStore(open_cache(tmp_path / f"cache{declared}")))
    plain, declared = stores
    assert (plain.cache.ignore_value, declared.cache.ignore_value) == (None, IGNORE_VALUE)
    ids = plain.cache.case_ids
    for case_id in ids:
        np.testing.assert_array_equal(plain.get(case_id).label, declared.get(case_id).label)
    for make in (
        lambda store: InstanceBalancedPlanner(store, ids, (8, 8, 8), seed=3),
        lambda store: ClassBalancedPlanner(store, ids, (8, 8, 8), 3, count=40, class_fraction=0.5),
        lambda store: BodyUniformPlanner(store, ids, (8, 8, 8), seed=3, count=40),
    ):
        assert make(plain).plan(1) == make(declared).plan(1)


# --------------------------------------------------------------------------- the metric rule


def _box(shape, x, y, z) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[slice(*x), slice(*y), slice(*z)] = True
    return mask


def test_evaluation_leaves_ignored_voxels_out_of_both_sides(tmp_path: Path) -> None:
    """Worked case on a 1 mm grid, ignore at x >= 12. Reference: lesion A (27 voxels); a lesion
    that lay at x 15-17 was overwritten by ``ignore`` (the scanner import does this where no
    station covers it). Prediction: A' (18 voxels, inside A), F (8 voxels, annotated
    background), G (27 voxels on the overwritten lesion, all ignored) and H (16 voxels, 8 of
    them ignored).

    After the rule: one lesion, detected (R = 1, the overwritten one is no miss); components
    A', F and the annotated half of H (G is gone, neither TP nor FP): P = 1/3, FP = 2,
    F2 = 5 x 1/3 x 1 / (4/3 + 1) = 5/7; Dice(A) = 2 x 18 / (27 + 18) = 0.8; global Dice =
    2 x 18 / (27 + 34) = 36/61 (34 predicted voxels are annotated).
    """
    shape = (24, 12, 12)
    affine = affine_for((1.0, 1.0, 1.0))
    label = np.zeros(shape, np.uint8)
    label[_box(shape, (2, 5), (2, 5), (2, 5))] = 1
    label[IGNORED_FROM_X:] = 2
    pred = (
        _box(shape, (2, 5), (2, 5), (2, 4))
        | _box(shape, (6, 8), (8, 10), (8, 10))
        | _box(shape, (15, 18), (2, 5), (2, 5))
        | _box(shape, (10, 14), (8, 10), (8, 10))
    )
    dataset = tmp_path / "ds"
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    save(dataset / "imagesTr/p1_0000.nii.gz", image, affine)
    save(dataset / "labelsTr/p1.nii.gz", label, affine)
    spec = {
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "lesion": 1, "ignore": 2},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    (dataset / "dataset.json").write_text(json.dumps(spec))
    save(tmp_path / "pred/p1.nii.gz", pred.astype(np.uint8), affine)

    evaluation = evaluate_predictions(tmp_path / "pred", dataset, ["p1"])
    (case,) = evaluation.cases.to_dict("records")
    assert (case["n_gt"], case["n_detected"], case["n_pred"], case["n_fp"]) == (1, 1, 3, 2)
    assert case["sensitivity"] == 1.0 and case["precision"] == pytest.approx(1 / 3)
    assert case["f2"] == pytest.approx(5 / 7)
    assert case["global_dice"] == pytest.approx(36 / 61)
    assert case["pred_volume_ml"] == pytest.approx(0.034)
    (lesion,) = evaluation.lesions.to_dict("records")
    assert lesion["dice"] == pytest.approx(0.8)
    assert evaluation.summary["rules"]["ignore"] == IGNORE_RULE


def test_skeleton_validation_scores_annotated_voxels_only() -> None:
    """Worked case: class 1 predicted on its 8 voxels and on 8 ignored ones, class 2 only on
    ignored voxels, class 3 on 4 annotated background voxels. Per class: 1.0 (the ignored
    extra is not counted), 1.0 (absent from both sides once ignored voxels are left out), 0.0,
    and 1.0 for the six absent classes; mean 8/9. Whole skeleton: 2 x 8 / (12 + 8) = 0.8."""
    names = ["background", *[f"region{k}" for k in range(1, 10)]]
    info = {
        "in_channels": 2,
        "num_classes": 10,
        "channel_names": ["T1", "b1000"],
        "label_names": names,
        "spacing": [1.0, 1.0, 1.0],
        "ignore_value": IGNORE_VALUE,
    }
    module = build_module(load_config(TINY_CONFIG, ["task=skeleton"]), info)
    shape = (16, 8, 8)
    label = np.zeros(shape, np.int64)
    label[_box(shape, (2, 4), (2, 4), (2, 4))] = 1
    label[8:] = IGNORE_VALUE
    predicted = np.zeros(shape, np.int64)
    predicted[_box(shape, (2, 4), (2, 4), (2, 4)) | _box(shape, (9, 11), (2, 4), (2, 4))] = 1
    predicted[_box(shape, (12, 14), (5, 7), (5, 7))] = 2
    predicted[_box(shape, (5, 6), (5, 7), (5, 7))] = 3
    probabilities = torch.nn.functional.one_hot(torch.from_numpy(predicted), 10)
    probabilities = probabilities.movedim(-1, 0)[None].float()
    module.predict_case = lambda image, body=None: probabilities  # type: ignore[method-assign]
    batch = {
        "image": torch.zeros(1, 2, *shape),
        "label": torch.from_numpy(label)[None, None],
        "spacing": torch.ones(1, 3, dtype=torch.float64),
        "case_id": ["v1"],
    }
    module.validation_step(batch, 0)
    values = module.compute_case_metrics()
    assert [values[f"val/dice_region{k}"] for k in (1, 2, 3)] == [1.0, 1.0, 0.0]
    assert values["val/dice_mean"] == pytest.approx(8 / 9)
    assert values["val/dice_skeleton"] == pytest.approx(0.8)

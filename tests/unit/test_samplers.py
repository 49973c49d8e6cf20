"""Epoch plans and patch placement: instance-balanced (lesion), class-balanced (skeleton) and
body-uniform (SSL) sampling on tiny cached cohorts.

Expectations are computed independently of the library: lesions are re-found in the NIfTI
labels with scipy (not cc3d), windows are checked voxel by voxel on the label and body arrays.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sap_lightning.batches.patches import PatchDataset, read_window
from sap_lightning.batches.planners import (
    BODY,
    CLASS,
    NEGATIVE,
    POSITIVE,
    BodyUniformPlanner,
    ClassBalancedPlanner,
    EpochPlan,
    InstanceBalancedPlanner,
    PatchTask,
    choose_patch_origin,
    origin_bounds,
    positive_region,
)
from sap_lightning.batches.store import CaseStore
from sap_lightning.cache import open_cache, preprocess_dataset
from sap_lightning.core.errors import DatasetError
from tests.datasets import affine_for, body_of, save, write_tiny_dataset

PATCH = (8, 8, 8)
LESION_COUNTS = [1, 3, 0, 2, 2, 1]
SPACING = (1.5, 1.5, 4.0)
ORIGIN = (-10.0, 5.0, 2.5)  # the tiny datasets' affine origin


def _cache(root: Path, dataset: Path) -> CaseStore:
    preprocess_dataset(dataset, root)
    return CaseStore(open_cache(root))


@pytest.fixture(scope="session")
def lesion_store(tmp_path_factory: pytest.TempPathFactory) -> CaseStore:
    """Six patients of (24, 20, 16) voxels with 0-3 small lesions each."""
    base = tmp_path_factory.mktemp("ib")
    dataset = write_tiny_dataset(
        base / "lesion", n_cases=6, shape=(24, 20, 16), lesions_per_case=LESION_COUNTS
    )
    return _cache(base / "cache", dataset)


@pytest.fixture(scope="session")
def big_lesion_store(tmp_path_factory: pytest.TempPathFactory) -> CaseStore:
    """One patient whose only lesion is an L-shaped bar 14 voxels long (longer than a patch)."""
    base = tmp_path_factory.mktemp("big")
    dataset = write_tiny_dataset(base / "lesion", n_cases=2, shape=(30, 30, 20))
    label = np.zeros((30, 30, 20), np.uint8)
    label[8:22, 14, 10] = 1
    label[8, 14:20, 10] = 1
    save(dataset / "labelsTr" / "case000.nii.gz", label, affine_for(SPACING, ORIGIN))
    return _cache(base / "cache", dataset)


@pytest.fixture(scope="session")
def skeleton_store(tmp_path_factory: pytest.TempPathFactory) -> CaseStore:
    """Three volunteers with a large class 1, a middle-sized class 2 and a one-voxel class 9."""
    base = tmp_path_factory.mktemp("cb")
    shape = (40, 40, 24)
    dataset = write_tiny_dataset(
        base / "skeleton", n_cases=3, task="skeleton", shape=shape, lesions_per_case=0
    )
    body = body_of(shape)
    for index in range(3):
        label = np.zeros(shape, np.uint8)
        label[13:27, 11:25, 8:16] = 1  # 1568 voxels
        label[14:18, 28:31, 10:13] = 2  # 36 voxels
        label[20, 31 + index, 12] = 9  # one voxel
        assert body[label > 0].all()
        save(dataset / "labelsTr" / f"case{index:03d}.nii.gz", label, affine_for(SPACING, ORIGIN))
    return _cache(base / "cache", dataset)


def _lesions_from_nifti(store: CaseStore) -> set[tuple[str, tuple[int, ...]]]:
    """(case, bbox) of every 6-connected lesion, found with scipy in the dataset's NIfTI files."""
    found = set()
    structure = ndimage.generate_binary_structure(3, 1)
    for case_id in store.cache.case_ids:
        path = store.cache.dataset / "labelsTr" / f"{case_id}.nii.gz"
        components, _ = ndimage.label(np.asanyarray(nib.load(path).dataobj) > 0, structure)
        for box in ndimage.find_objects(components):
            found.add((case_id, (*(s.start for s in box), *(s.stop for s in box))))
    return found


def _ib_planner(store: CaseStore, seed: int = 0, multiple: int = 1) -> InstanceBalancedPlanner:
    return InstanceBalancedPlanner(store, store.cache.case_ids, PATCH, seed, 2, 4 / 3, multiple)


def _dataset(store: CaseStore, plan: EpochPlan, with_label: bool = True) -> PatchDataset:
    return PatchDataset(store, plan, PATCH, None, with_label, seed=0)


# --------------------------------------------------------------------------- instance-balanced


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_every_lesion_is_the_focus_of_exactly_one_positive_per_epoch(lesion_store, epoch):
    plan = _ib_planner(lesion_store).plan(epoch)
    positives = [(t.case_id, t.focus) for t in plan if t.kind == POSITIVE]
    assert sum(LESION_COUNTS) == len(positives) == len(set(positives))
    assert set(positives) == _lesions_from_nifti(lesion_store)
    assert sorted(t.index for t in plan) == list(range(len(plan)))


def test_negatives_equal_positives_up_to_the_rank_batch_multiple(lesion_store):
    lesions = sum(LESION_COUNTS)  # 9
    for multiple, expected_total in ((1, 18), (4, 20), (7, 21)):
        planner = _ib_planner(lesion_store, multiple=multiple)
        plan = planner.plan(0)
        kinds = Counter(t.kind for t in plan)
        assert len(plan) == planner.num_tasks == expected_total
        assert kinds[POSITIVE] == lesions
        assert kinds[NEGATIVE] == expected_total - lesions


def test_negative_windows_hold_no_lesion_voxel_and_are_centred_in_the_body(lesion_store):
    planner = _ib_planner(lesion_store)
    negatives = [t for epoch in range(8) for t in planner.plan(epoch) if t.kind == NEGATIVE]
    assert len(negatives) == 8 * 9
    for task in negatives:
        case = lesion_store.get(task.case_id)
        lo, hi = np.asarray(task.region[:3]), np.asarray(task.region[3:])
        assert np.array_equal(hi - lo, PATCH)
        window = tuple(slice(a, b) for a, b in zip(lo, hi))
        assert not np.asarray(case.label)[window].any(), task
        centre = np.asarray(task.focus[:3])
        assert np.all(lo <= centre) and np.all(centre < hi)
        assert case.body_mask[tuple(centre)] == 1, task
    # negatives come from every case, including the lesion-free one
    assert {t.case_id for t in negatives} == set(lesion_store.cache.case_ids)


def test_negative_patches_read_through_the_dataset_are_lesion_free(lesion_store):
    plan = EpochPlan(_ib_planner(lesion_store), epoch=3)
    dataset = _dataset(lesion_store, plan)
    for index, task in enumerate(plan.tasks):
        patch = dataset[index]
        if task.kind == NEGATIVE:
            assert not patch["label"].data.any()
        else:  # a small lesion is always entirely in view
            assert patch["label"].data.any()


def test_positive_patch_contains_its_whole_lesion(lesion_store):
    structure = ndimage.generate_binary_structure(3, 1)
    planner = _ib_planner(lesion_store)
    for epoch in range(4):
        plan = EpochPlan(planner, epoch)
        dataset = _dataset(lesion_store, plan)
        for index, task in enumerate(plan.tasks):
            if task.kind != POSITIVE:
                continue
            patch = dataset[index]
            lo = np.asarray(patch["location"][:3])
            components, _ = ndimage.label(
                np.asarray(lesion_store.get(task.case_id).label) > 0, structure
            )
            voxels = np.argwhere(components == components[tuple(task.focus[:3])])
            assert np.all(voxels >= lo) and np.all(voxels < lo + PATCH), (task, lo)


def test_lesion_longer_than_a_patch_is_always_partly_in_view(big_lesion_store):
    store = big_lesion_store
    planner = InstanceBalancedPlanner(store, ["case000"], (6, 6, 6), 0, 2, 4 / 3)
    seen_lo = set()
    for epoch in range(30):
        plan = EpochPlan(planner, epoch)
        dataset = PatchDataset(store, plan, (6, 6, 6), None, True, seed=epoch)
        (index,) = [i for i, t in enumerate(plan.tasks) if t.kind == POSITIVE]
        patch = dataset[index]
        assert patch["label"].data.sum() >= 1
        x0 = int(patch["location"][0])
        assert 8 <= x0 <= 22 - 6  # inside the lesion's extent along its long axis
        seen_lo.add(x0)
    assert len(seen_lo) > 3  # the patch slides along the lesion


def test_plans_change_between_epochs_and_repeat_for_a_seed(lesion_store):
    planner = _ib_planner(lesion_store, seed=7)
    same_seed = _ib_planner(lesion_store, seed=7)
    other_seed = _ib_planner(lesion_store, seed=8)
    assert planner.plan(0) == same_seed.plan(0)
    assert planner.plan(3) == same_seed.plan(3)
    assert planner.plan(0) != planner.plan(1)
    assert planner.plan(0) != other_seed.plan(0)
    negatives = [{t.region for t in planner.plan(e) if t.kind == NEGATIVE} for e in range(2)]
    assert negatives[0] != negatives[1]  # a fresh draw of negatives every epoch


def test_epoch_plan_redraws_only_on_a_new_epoch(lesion_store):
    plan = EpochPlan(_ib_planner(lesion_store), epoch=0)
    first = list(plan.tasks)
    plan.set_epoch(0)
    assert plan.tasks == first
    plan.set_epoch(1)
    assert plan.tasks != first and len(plan) == len(first)


def test_no_lesion_in_training_cases_is_refused(lesion_store):
    with pytest.raises(DatasetError, match="no lesion"):
        InstanceBalancedPlanner(lesion_store, ["case002"], PATCH, 0)


def test_patch_larger_than_every_lesion_free_window_is_refused(lesion_store):
    planner = InstanceBalancedPlanner(lesion_store, ["case001"], (24, 20, 16), 0)
    with pytest.raises(DatasetError, match="lesion-free window"):
        planner.plan(0)


# --------------------------------------------------------------------------- class-balanced


def test_class_balanced_patches_show_small_classes_far_more_than_uniform(skeleton_store):
    cases = skeleton_store.cache.case_ids
    patch = (6, 6, 6)
    balanced = EpochPlan(ClassBalancedPlanner(skeleton_store, cases, patch, 0, count=300))
    uniform = EpochPlan(BodyUniformPlanner(skeleton_store, cases, patch, 0, count=300))

    targets = Counter(t.target for t in balanced.tasks)
    assert set(targets) == {1, 2, 9}
    assert all(70 <= n <= 130 for n in targets.values())  # 100 expected each (sd 8)

    def fraction_showing(plan: EpochPlan, value: int) -> float:
        dataset = PatchDataset(skeleton_store, plan, patch, None, True, seed=0)
        hits = [bool((dataset[i]["label"].data == value).any()) for i in range(len(plan))]
        for index, task in enumerate(plan.tasks):  # a class task always shows its class
            assert task.kind == BODY or hits[index] or task.target != value
        return float(np.mean(hits))

    balanced_sternum = fraction_showing(balanced, 9)
    uniform_sternum = fraction_showing(uniform, 9)
    assert balanced_sternum >= 0.25
    assert balanced_sternum > 5 * uniform_sternum


@pytest.mark.parametrize("fraction", [0.0, 0.33, 1.0])
def test_class_fraction_mixes_class_and_body_patches(skeleton_store, fraction):
    """``class_fraction`` of the plan is class-balanced, the rest body-centred (nnU-Net's
    foreground oversampling); body patches are centred on a body voxel, as uniform ones are."""
    cases = skeleton_store.cache.case_ids
    planner = ClassBalancedPlanner(
        skeleton_store, cases, (6, 6, 6), 0, count=99, class_fraction=fraction
    )
    tasks = planner.plan(1)
    kinds = Counter(task.kind for task in tasks)
    assert kinds[BODY] == 99 - round(99 * fraction)
    assert kinds[BODY] + kinds[CLASS] == len(tasks) == 99
    assert sorted(task.index for task in tasks) == list(range(99))
    for task in tasks:
        if task.kind == BODY:
            centre = task.focus[:3]
            assert skeleton_store.get(task.case_id).body_mask[centre]
    if 0 < fraction < 1:  # shuffled together, not one block after the other
        first_half = Counter(task.kind for task in tasks[:49])
        assert first_half[BODY] and first_half[CLASS]


def test_class_fraction_outside_zero_one_is_refused(skeleton_store):
    with pytest.raises(DatasetError, match="class_fraction"):
        ClassBalancedPlanner(
            skeleton_store, ["case000"], (6, 6, 6), 0, count=10, class_fraction=1.5
        )


def test_class_patch_contains_its_voxel_at_every_offset(skeleton_store):
    patch = np.array([6, 6, 6])
    planner = ClassBalancedPlanner(skeleton_store, ["case000"], patch, 0, count=30)
    task = next(t for t in planner.plan(0) if t.target == 9)
    voxel = np.array([20, 31, 12])  # case000's only class-9 voxel
    assert task.focus == (*voxel, *(voxel + 1))
    rng = np.random.default_rng(0)
    shape = np.array([40, 40, 24])
    origins = np.array([choose_patch_origin(task, patch, shape, rng) for _ in range(3000)])
    assert np.all(origins <= voxel) and np.all(origins + patch > voxel)
    # the voxel takes every position inside the patch, not only the centre
    offsets = voxel - origins
    for axis in range(3):
        assert set(offsets[:, axis]) == set(range(6))


# --------------------------------------------------------------------------- body-uniform (SSL)


def test_body_uniform_centres_lie_in_the_body(lesion_store):
    planner = BodyUniformPlanner(
        lesion_store, lesion_store.cache.case_ids, PATCH, 0, count=50, multiple=4
    )
    plan = planner.plan(2)
    assert len(plan) == planner.num_tasks == 52
    for task in plan:
        assert task.kind == BODY
        assert lesion_store.get(task.case_id).body_mask[task.focus[:3]] == 1


# --------------------------------------------------------------------------- geometry helpers


def test_positive_region_is_margin_box_grown_to_min_scale_inside_volume():
    shape = np.array([100, 100, 40])
    patch = np.array([12, 12, 12])
    region = positive_region((50, 50, 20, 52, 53, 21), patch, shape, margin=2, scale=4 / 3)
    lo, hi = np.array(region[:3]), np.array(region[3:])
    assert np.array_equal(hi - lo, [16, 16, 16])  # ceil(4/3 * 12), the margin box is smaller
    assert np.all(lo <= [48, 48, 18]) and np.all(hi >= [54, 55, 23])
    # near a border the region moves inside the volume instead of shrinking
    edge = positive_region((0, 98, 38, 1, 100, 40), patch, shape, margin=2, scale=4 / 3)
    assert edge == (0, 84, 24, 16, 100, 40)
    # a large lesion keeps its margin box
    big = positive_region((10, 10, 5, 40, 20, 8), patch, shape, margin=3, scale=4 / 3)
    assert big[0] == 7 and big[3] == 43


def test_origin_bounds_keep_a_fitting_focus_in_view_and_centre_small_volumes():
    task = PatchTask(0, "c", POSITIVE, (0, 0, 0, 20, 20, 6), (5, 9, 1, 8, 10, 3), 1)
    lo, hi = origin_bounds(task, np.array([8, 8, 10]), np.array([20, 20, 6]))
    assert lo.tolist() == [0, 2, -2] and hi.tolist() == [5, 9, -2]


def test_read_window_matches_padded_slicing():
    rng = np.random.default_rng(0)
    array = rng.random((2, 7, 6, 5)).astype(np.float32)
    padded = np.pad(array, ((0, 0), (4, 4), (4, 4), (4, 4)), constant_values=0)
    for lo in ([0, 0, 0], [-3, 2, 1], [4, -2, 3], [-4, -4, -4]):
        size = (5, 6, 4)
        expected = padded[:, lo[0] + 4 : lo[0] + 9, lo[1] + 4 : lo[1] + 10, lo[2] + 4 : lo[2] + 8]
        np.testing.assert_array_equal(read_window(array, lo, size), expected)

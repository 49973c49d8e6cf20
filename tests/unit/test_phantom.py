"""The synthetic WB-MRI cohort: anatomy, labels, lesions, distractors, determinism, datasets.

The mimics, sites, knob and tissue maps of docs/cohort.md have their own file
(``test_cohort_mimics.py``).
"""

from __future__ import annotations

import dataclasses
import math

import cc3d
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sap_lightning import synthetic as ph
from sap_lightning.core.errors import ConfigError, DatasetError
from sap_lightning.core.io import read_json
from sap_lightning.dataset import layout

SMALL_SHAPE, SMALL_SPACING = ph.SIZES["small"]
TINY_SHAPE, TINY_SPACING = ph.SIZES["tiny"]
BONE_TISSUES = ph.BONE_TISSUES


@pytest.fixture(scope="module")
def healthy() -> list[ph.PhantomCase]:
    return [ph.generate_healthy_case(0, i, SMALL_SHAPE, SMALL_SPACING) for i in range(2)]


@pytest.fixture(scope="module")
def patients() -> list[ph.PhantomCase]:
    # Seed 0: these three hold 16 lesions together (checked in test_patients_fixture).
    return [ph.generate_patient_case(0, i, SMALL_SHAPE, SMALL_SPACING) for i in (2, 3, 5)]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> ph.CohortPaths:
    out = tmp_path_factory.mktemp("cohort") / "phantoms"
    return ph.make_phantom_cohort(out, 3, 2, seed=5, shape=TINY_SHAPE, spacing=TINY_SPACING)


def test_patients_fixture(patients):
    counts = [len(case.lesions) for case in patients]
    assert min(counts) >= 1 and sum(counts) >= 10, counts


def test_every_skeleton_class_in_every_case_inside_image_and_body(healthy, patients):
    for case in healthy + patients:
        skeleton = case.skeleton
        assert skeleton.dtype == np.uint8
        assert set(np.unique(skeleton)) == set(range(10)), case.case_id
        labelled = skeleton > 0
        for axis in range(3):  # nothing cut off by the field of view
            assert not labelled.take([0, -1], axis=axis).any(), case.case_id
        # Bones are covered by soft tissue: no labelled voxel touches air.
        next_to_air = ndimage.binary_dilation(case.maps.tissue == ph.Tissue.AIR)
        assert not (labelled & next_to_air).any(), case.case_id


def test_anatomy_maps_are_consistent(patients):
    for case in patients:
        bone_tissue = np.isin(case.maps.tissue, BONE_TISSUES)
        np.testing.assert_array_equal(bone_tissue, case.maps.bone)
        # Skeleton labels are the region codes 1-9 and nothing else.
        region = case.maps.region
        np.testing.assert_array_equal(case.skeleton > 0, (region >= 1) & (region <= 9))


def test_vertebral_bodies_alternate_with_discs(healthy):
    """Along the lumbar spine axis, bone and disc voxels alternate (a stack, not a rod)."""
    case = healthy[0]
    lumbar = case.skeleton == layout.SKELETON_LABELS["lumbar_spine"]
    z_lumbar = np.flatnonzero(lumbar.any(axis=(0, 1)))
    discs = case.maps.tissue == ph.Tissue.DISC
    z_discs = np.flatnonzero(discs.any(axis=(0, 1)))
    inside = z_discs[(z_discs > z_lumbar.min()) & (z_discs < z_lumbar.max())]
    assert len(inside) >= 3  # at least the discs between L1-L2 ... L4-L5


def test_ribs_are_bone_with_marrow_but_unlabelled(healthy):
    for case in healthy:
        ribs = case.maps.ribs
        assert ribs.sum() > 200
        assert not case.skeleton[ribs].any()
        assert np.isin(case.maps.tissue[ribs], BONE_TISSUES).all()
        rib_marrow = ribs & case.maps.marrow
        assert rib_marrow.sum() > 20  # a marrow core, not only a cortical rim
        # Rib marrow looks like the vertebrae's red marrow (blurred a little more, ribs are
        # thin): brighter than muscle on T1, about as bright as vertebral marrow on b1000
        # (docs/cohort.md: red marrow 2.2 x muscle on b1000).
        muscle = case.maps.tissue == ph.Tissue.MUSCLE
        vertebral = case.maps.marrow & (case.skeleton == layout.SKELETON_LABELS["thoracic_spine"])
        assert case.t1[rib_marrow].mean() > 1.2 * case.t1[muscle].mean()
        assert case.t1[rib_marrow].mean() > 0.7 * case.t1[vertebral].mean()
        ratio = case.b1000[rib_marrow].mean() / case.b1000[vertebral].mean()
        assert 0.6 < ratio < 1.3, ratio


def test_fat_bright_on_t1_and_dark_on_b1000_air_near_zero(healthy):
    case = healthy[0]
    fat, muscle = (case.maps.tissue == t for t in (ph.Tissue.FAT, ph.Tissue.MUSCLE))
    air = case.maps.tissue == ph.Tissue.AIR
    assert case.t1[fat].mean() > 2 * case.t1[muscle].mean()
    assert case.b1000[fat].mean() < case.b1000[muscle].mean()
    for image in (case.t1, case.b1000):
        assert image.dtype == np.float32 and image.min() >= 0
    # Air holds only the Rician noise floor; b1000 has the lower signal-to-noise ratio
    # (muscle at about 2.8 noise sigmas: docs/cohort.md 1.4 and section 2).
    assert case.t1[air].mean() < 0.1 * case.t1[muscle].mean()
    assert case.b1000[air].mean() < 0.7 * case.b1000[muscle].mean()


def test_lesions_inside_bone_and_never_touching(patients):
    voxel_ml = float(np.prod(SMALL_SPACING)) / 1000
    n_total = 0
    for case in patients:
        mask = case.lesion_mask
        assert mask.dtype == np.uint8
        # In bone, except the extension of a lesion that grew through its cortex.
        extension = case.maps.tissue == ph.Tissue.LESION_EXTENSION
        assert case.maps.bone[(mask > 0) & ~extension].all(), case.case_id
        assert not case.maps.bone[extension].any()
        assert np.array_equal(mask > 0, np.isin(case.maps.tissue, ph.LESION_TISSUES))
        for lesion in case.lesions:
            voxels = case.lesion_ids == lesion.index
            assert (extension[voxels].sum() * voxel_ml) == pytest.approx(lesion.extension_ml)
        # 26-connected components = lesions, hence also 6-connected ones.
        for connectivity in (6, 26):
            _, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
            assert n == len(case.lesions), (case.case_id, connectivity)
        for lesion in case.lesions:
            voxels = int((case.lesion_ids == lesion.index).sum())
            assert lesion.volume_ml == pytest.approx(voxels * voxel_ml)
            assert voxels >= ph.MIN_LESION_VOXELS
        n_total += len(case.lesions)
    assert n_total >= 10


def test_lesions_can_sit_in_ribs():
    """Metastases grow anywhere in the red-marrow skeleton, the unlabelled ribs included."""
    fov = ph.fov_of(TINY_SHAPE, TINY_SPACING)
    regions = []
    for index in range(12):
        anatomy = ph.patient_anatomy(0, index, fov)
        rng = np.random.default_rng(index)
        maps = ph.render_anatomy(
            anatomy, ph.sample_scan_pose(rng, anatomy), TINY_SHAPE, TINY_SPACING
        )
        ids, lesions = ph.place_lesions(rng, maps, TINY_SPACING, [0.5] * 6)
        assert maps.bone[ids > 0].all()
        regions += [lesion.region for lesion in lesions]
    assert ph.RIB_REGION in regions
    assert len(set(regions)) >= 6


def test_lesion_contrast_against_marrow():
    """Rendered without noise in a block of red marrow, a viable metastasis is brighter than
    marrow on b1000 and darker on T1 (its drawn look, give or take its texture); a sclerotic
    one is darker on T1 and no brighter than 1.2 x marrow on b1000; edge voxels keep part of
    the contrast only."""
    shape, spacing = (40, 40, 24), (3.0, 3.0, 6.0)
    tissue = np.full(shape, ph.Tissue.MUSCLE, np.uint8)
    region = np.zeros(shape, np.uint8)
    region[4:36, 4:36, 2:22] = layout.SKELETON_LABELS["pelvis"]
    tissue[region > 0] = ph.Tissue.MARROW
    maps = ph.AnatomyMaps(tissue=tissue, region=region)
    base = tissue.copy()
    ids, lesions = ph.place_lesions(
        np.random.default_rng(2), maps, spacing, [3.0, 3.0], extension_share=0.0
    )
    viable = dataclasses.replace(lesions[0], sclerotic=False, t1=0.2, b1000=0.33, texture=0.2)
    sclerotic = dataclasses.replace(lesions[1], sclerotic=True, t1=0.08, b1000=0.09, texture=0.2)
    anatomy = ph.patient_anatomy(0, 0, ph.fov_of(shape, spacing))
    no_mimics = np.zeros(shape, np.int16)
    t1, b1000 = ph.render_images(
        np.random.default_rng(0), anatomy, maps, base, ids, [viable, sclerotic], no_mimics, [],
        spacing, noise=False,
    )  # fmt: skip
    t1, b1000 = t1 / ph.CHANNEL_SCALE[0], b1000 / ph.CHANNEL_SCALE[1]
    marrow = (ids == 0) & (region > 0) & ~ndimage.binary_dilation(ids > 0, iterations=2)
    marrow_t1, marrow_b1000 = np.median(t1[marrow]), np.median(b1000[marrow])
    for lesion in (viable, sclerotic):
        voxels = ids == lesion.index
        inner = ndimage.binary_erosion(voxels, iterations=1)
        edge = voxels & ~inner
        assert inner.sum() >= 3
        assert np.median(t1[inner]) < 0.6 * marrow_t1
        if lesion.sclerotic:
            assert np.median(b1000[inner]) < 1.2 * marrow_b1000
        else:
            assert np.median(b1000[inner]) == pytest.approx(0.33, rel=0.25)
            assert np.median(b1000[inner]) > 2.0 * marrow_b1000
            # The soft edge: boundary voxels sit between marrow and the lesion's core.
            assert marrow_b1000 < np.median(b1000[edge]) < np.median(b1000[inner])


def test_lesion_looks_follow_the_table():
    """Sclerotic share 20%; viable T1 0.12-0.32 and b1000 1.2-4.0 x red marrow (log-uniform,
    median about 2.2 x); sclerotic T1 0.04-0.12 and b1000 0.6-1.2 x; texture and edge ranges."""
    looks = [ph.sample_lesion_look(np.random.default_rng([1, i])) for i in range(4000)]
    sclerotic = [x for x in looks if x["sclerotic"]]
    viable = [x for x in looks if not x["sclerotic"]]
    assert 0.17 <= len(sclerotic) / len(looks) <= 0.23
    ratio = np.array([x["b1000"] for x in viable]) / ph.RED_MARROW_B1000
    assert ratio.min() >= 1.2 and ratio.max() <= 4.0
    assert np.median(ratio) == pytest.approx(math.sqrt(1.2 * 4.0), rel=0.05)
    assert all(0.12 <= x["t1"] <= 0.32 for x in viable)
    assert all(0.04 <= x["t1"] <= 0.12 for x in sclerotic)
    assert all(0.6 <= x["b1000"] / ph.RED_MARROW_B1000 <= 1.2 for x in sclerotic)
    assert all(0.10 <= x["texture"] <= 0.35 and 0.5 <= x["edge"] <= 0.8 for x in looks)


def test_distractors_bright_on_b1000_outside_bone_and_lesions(patients):
    """The anatomy bright on b1000 (spleen, kidneys, cord, brain) lies outside bone, is never a
    lesion and is brighter than red marrow, whatever the mimics knob."""
    for case in patients:
        marrow_b1000 = case.b1000[case.maps.marrow].mean()
        for tissue in ph.DISTRACTOR_TISSUES:
            voxels = case.maps.tissue == tissue
            assert voxels.sum() >= 3, (case.case_id, tissue.name)
            assert not case.maps.bone[voxels].any()
            assert not case.lesion_mask[voxels].any()
            assert case.b1000[voxels].mean() > 1.5 * marrow_b1000, (case.case_id, tissue.name)


def test_spinal_cord_lies_in_the_canal_between_body_and_spinous_process(healthy):
    case = healthy[0]
    cord = case.maps.tissue == ph.Tissue.CORD
    spine = (case.skeleton >= 1) & (case.skeleton <= 3)
    slices = np.flatnonzero(cord.any(axis=(0, 1)) & spine.any(axis=(0, 1)))
    assert len(slices) > 20
    bone_in_front = bone_behind = 0
    for z in slices:
        y_cord = np.flatnonzero(cord[:, :, z].any(axis=0))
        y_spine = np.flatnonzero(spine[:, :, z].any(axis=0))
        bone_in_front += y_spine.max() > y_cord.max()  # y points anterior
        bone_behind += y_spine.min() < y_cord.min()
        # CSF all round: the cord never touches bone in-plane.
        ring = ndimage.binary_dilation(cord[:, :, z]) & ~cord[:, :, z]
        assert not case.maps.bone[:, :, z][ring].any(), z
    # Vertebral bodies in front of the cord except at disc levels; the arch behind it.
    assert bone_in_front >= 0.5 * len(slices)
    assert bone_behind >= 0.9 * len(slices)


def test_lesion_volume_sampler_matches_the_paper():
    volumes = ph.sample_lesion_volumes_ml(np.random.default_rng(0), 5000)
    assert 0.3 <= np.median(volumes) <= 0.8
    assert 0.15 <= np.mean(volumes >= 1.0) <= 0.4
    assert volumes.max() <= ph.LESION_MAX_ML


def test_lesion_count_sampler_spread():
    """At least one per patient, skewed (mean above median, a long right tail), no cap."""
    counts = np.array([ph.sample_lesion_count(np.random.default_rng([0, i])) for i in range(4000)])
    assert counts.min() == 1
    assert np.median(counts) == 4 and 5.6 <= counts.mean() <= 6.4
    assert 0.07 <= np.mean(counts >= 14) <= 0.13
    assert counts.max() > 30  # the old cap was 12


def test_place_lesions_on_a_hand_made_bone():
    """Volumes are met exactly when the bone has room; lesions stay apart and in the bone."""
    shape, spacing = (40, 40, 20), (3.0, 3.0, 6.0)
    tissue = np.full(shape, ph.Tissue.MUSCLE, np.uint8)
    region = np.zeros(shape, np.uint8)
    region[5:35, 5:35, 3:17] = layout.SKELETON_LABELS["pelvis"]
    tissue[region > 0] = ph.Tissue.MARROW
    maps = ph.AnatomyMaps(tissue=tissue, region=region)
    voxel_ml = 54 / 1000
    wanted = [0.5, 1.2, 0.054, 2.0]  # 9, 22, 1 (-> minimum 3) and 37 voxels
    ids, lesions = ph.place_lesions(
        np.random.default_rng(3), maps, spacing, wanted, extension_share=0.0
    )
    expected = [9, 22, ph.MIN_LESION_VOXELS, 37]
    assert [round(les.volume_ml / voxel_ml) for les in lesions] == expected
    assert [int((ids == les.index).sum()) for les in lesions] == expected
    assert (region[ids > 0] > 0).all()
    assert (maps.tissue[ids > 0] == ph.Tissue.LESION).all()
    _, n = cc3d.connected_components(ids > 0, connectivity=26, return_N=True)
    assert n == 4


def test_lesion_is_clipped_to_a_small_bone():
    shape, spacing = (20, 20, 10), (3.0, 3.0, 6.0)
    tissue = np.full(shape, ph.Tissue.MUSCLE, np.uint8)
    region = np.zeros(shape, np.uint8)
    region[8:12, 8:12, 4:6] = ph.RIB_REGION  # 32 voxels of bone
    tissue[region > 0] = ph.Tissue.MARROW
    maps = ph.AnatomyMaps(tissue=tissue, region=region)
    ids, lesions = ph.place_lesions(
        np.random.default_rng(0), maps, spacing, [5.0], extension_share=0.0
    )
    assert len(lesions) == 1 and (ids > 0).sum() == 32 and lesions[0].intended_ml == 5.0


def test_an_extending_lesion_grows_through_the_cortex_into_muscle():
    """With every lesion of >= 1 mL extending, a lesion in a small bone spills into the muscle
    beside it: one connected lesion, its extension labelled too and marked in the tissue map."""
    shape, spacing = (30, 30, 12), (3.0, 3.0, 6.0)
    tissue = np.full(shape, ph.Tissue.MUSCLE, np.uint8)
    region = np.zeros(shape, np.uint8)
    region[10:20, 10:20, 3:9] = layout.SKELETON_LABELS["pelvis"]
    tissue[region > 0] = ph.Tissue.MARROW
    tissue[10:20, 10:20, 3:9][[0, -1]] = ph.Tissue.CORTEX
    maps = ph.AnatomyMaps(tissue=tissue, region=region)
    ids, lesions = ph.place_lesions(
        np.random.default_rng(1), maps, spacing, [1.5], extension_share=1.0
    )
    (lesion,) = lesions
    extension = maps.tissue == ph.Tissue.LESION_EXTENSION
    assert lesion.extension_ml > 0 and extension.any()
    assert (ids[extension] == 1).all() and not maps.bone[extension].any()
    assert (region[ids > 0] > 0).sum() >= 0.8 * round(1.5 / 0.054)
    _, n = cc3d.connected_components(ids > 0, connectivity=6, return_N=True)
    assert n == 1


def test_same_seed_same_arrays_other_seed_differs():
    a = ph.generate_patient_case(7, 2, TINY_SHAPE, TINY_SPACING)
    b = ph.generate_patient_case(7, 2, TINY_SHAPE, TINY_SPACING)
    c = ph.generate_patient_case(8, 2, TINY_SHAPE, TINY_SPACING)
    for name in ("t1", "b1000", "lesion_ids"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    np.testing.assert_array_equal(a.skeleton, b.skeleton)
    assert not np.array_equal(a.t1, c.t1)
    assert a.anatomy != c.anatomy


def test_case_does_not_depend_on_cohort_size(tmp_path, cohort):
    small = ph.make_phantom_cohort(
        tmp_path / "one", 1, 1, seed=5, shape=TINY_SHAPE, spacing=TINY_SPACING
    )
    for folder, case in ((small.skeleton, "healthy_000"), (small.lesion, "patient_000")):
        other = cohort.skeleton if folder == small.skeleton else cohort.lesion
        for path in (layout.image_path(folder, case, 1), layout.label_path(folder, case)):
            twin = other / path.relative_to(folder)
            np.testing.assert_array_equal(nib.load(path).get_fdata(), nib.load(twin).get_fdata())


def test_volunteers_have_one_to_three_scans_of_one_anatomy():
    seen: dict[int, list[int]] = {}
    for index in range(40):
        volunteer, scan = ph.volunteer_of_scan(0, index)
        assert scan == len(seen.setdefault(volunteer, []))
        seen[volunteer].append(index)
    assert list(seen) == list(range(len(seen)))
    sizes = [len(v) for v in list(seen.values())[:-1]]  # the last one may be cut short
    assert set(sizes) <= {1, 2, 3} and len(set(sizes)) >= 2
    repeated = next(indexes for indexes in seen.values() if len(indexes) >= 2)
    first, second = (ph.generate_healthy_case(0, i, TINY_SHAPE, TINY_SPACING) for i in repeated[:2])
    assert first.subject_id == second.subject_id
    assert first.anatomy == second.anatomy and first.pose != second.pose
    assert not np.array_equal(first.t1, second.t1)
    # Same bones in a different pose: per-class volumes agree within a few percent.
    a, b = (np.bincount(c.skeleton.ravel(), minlength=10)[1:] for c in (first, second))
    assert np.all(np.abs(a - b) <= 0.15 * np.maximum(a, b)), (a, b)


def test_dataset_json_and_files(cohort):
    skeleton = read_json(cohort.skeleton / layout.DATASET_JSON)
    lesion = read_json(cohort.lesion / layout.DATASET_JSON)
    for spec, labels, prefix, n in (
        (skeleton, layout.SKELETON_LABELS, "healthy", 3),
        (lesion, layout.LESION_LABELS, "patient", 2),
    ):
        assert spec["channel_names"] == {"0": "T1", "1": "b1000"}
        assert spec["labels"] == labels
        assert spec["numTraining"] == n
        assert spec["file_ending"] == ".nii.gz"
        assert spec["name"]
        assert sorted(spec["subjects"]) == [f"{prefix}_{i:03d}" for i in range(n)]
    assert lesion["subjects"] == {case: case for case in lesion["subjects"]}
    volunteers = [ph.volunteer_of_scan(5, i)[0] for i in range(3)]
    assert list(skeleton["subjects"].values()) == [f"volunteer_{v:02d}" for v in volunteers]

    affine = layout.affine_from_spacing(TINY_SPACING)
    for folder, spec in ((cohort.skeleton, skeleton), (cohort.lesion, lesion)):
        for case in spec["subjects"]:
            files = [layout.image_path(folder, case, c) for c in (0, 1)]
            for path in files:
                image = nib.load(path)
                assert image.get_data_dtype() == np.float32 and image.shape == TINY_SHAPE
                np.testing.assert_allclose(image.affine, affine)
            label = nib.load(layout.label_path(folder, case))
            assert label.get_data_dtype() == np.uint8
            values = set(np.unique(np.asarray(label.dataobj)))
            assert values <= set(spec["labels"].values())
    for case, volumes in lesion["phantom"]["lesion_volumes_ml"].items():
        mask = np.asarray(nib.load(layout.label_path(cohort.lesion, case)).dataobj)
        assert mask.sum() * np.prod(TINY_SPACING) / 1000 == pytest.approx(sum(volumes), abs=1e-3)
        reference = np.asarray(
            nib.load(layout.skeleton_reference_path(cohort.lesion, case)).dataobj
        )
        assert set(np.unique(reference)) == set(range(10))


def test_existing_datasets_need_overwrite_and_other_content_survives(tmp_path):
    out = tmp_path / "out"
    ph.make_phantom_cohort(out, 1, 1, seed=0, shape=TINY_SHAPE, spacing=TINY_SPACING)
    keep = out / "notes.txt"
    keep.write_text("mine")
    before = (out / "skeleton" / layout.DATASET_JSON).read_bytes()
    with pytest.raises(DatasetError, match="overwrite"):
        ph.make_phantom_cohort(out, 2, 1, seed=1, shape=TINY_SHAPE, spacing=TINY_SPACING)
    assert (out / "skeleton" / layout.DATASET_JSON).read_bytes() == before
    ph.make_phantom_cohort(
        out, 2, 1, seed=1, shape=TINY_SHAPE, spacing=TINY_SPACING, overwrite=True
    )
    assert read_json(out / "skeleton" / layout.DATASET_JSON)["numTraining"] == 2
    assert keep.read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["lesion", "notes.txt", "skeleton"]


def test_grid_options():
    assert ph.resolve_grid() == ph.SIZES[ph.DEFAULT_SIZE]
    assert ph.resolve_grid("large") == ph.SIZES["large"]
    assert ph.resolve_grid(None, [64, 64, 96], [4, 4, 8]) == ((64, 64, 96), (4.0, 4.0, 8.0))
    for args, message in (
        (("small", [64, 64, 96], [4, 4, 8]), "not both"),
        ((None, [64, 64, 96], None), "together"),
        (("huge", None, None), "unknown size"),
        ((None, [64, 8, 96], [4, 4, 8]), ">= 16"),
        ((None, [64, 64, 96], [4, 0, 8]), "positive"),
    ):
        with pytest.raises(ConfigError, match=message):
            ph.resolve_grid(*args)


def test_skeleton_check_names_case_and_missing_region():
    skeleton = np.zeros((10, 10, 10), np.uint8)
    skeleton[2:8, 2:8, 2:8] = np.arange(1, 10).repeat(24)[:216].reshape(6, 6, 6)
    ph.check_skeleton_map("healthy_007", skeleton, (10, 10, 10), (3, 3, 6))
    without_clavicles = np.where(skeleton == 8, 0, skeleton)
    with pytest.raises(DatasetError, match=r"healthy_007: skeletal region\(s\) clavicles "):
        ph.check_skeleton_map("healthy_007", without_clavicles, (10, 10, 10), (3, 3, 6))
    skeleton[0, 5, 5] = 1
    with pytest.raises(DatasetError, match="healthy_007: the skeleton reaches the image border"):
        ph.check_skeleton_map("healthy_007", skeleton, (10, 10, 10), (3, 3, 6))


def test_too_coarse_grid_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(DatasetError, match=r"phantom case healthy_000: .* grid at"):
        ph.make_phantom_cohort(tmp_path / "x", 1, 1, shape=(16, 16, 16), spacing=(18, 18, 72))
    assert not (tmp_path / "x" / "skeleton").exists()
    assert not (tmp_path / "x" / "lesion").exists()


def test_failure_in_the_patients_keeps_the_previous_cohort_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    ph.make_phantom_cohort(out, 1, 1, seed=0, shape=TINY_SHAPE, spacing=TINY_SPACING)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args):
        raise DatasetError("patient_000: simulated failure")

    monkeypatch.setattr(ph.cohort, "generate_patient_case", broken)
    with pytest.raises(DatasetError, match="simulated"):
        ph.make_phantom_cohort(
            out, 2, 1, seed=1, shape=TINY_SHAPE, spacing=TINY_SPACING, overwrite=True
        )
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the new healthy scans were not swapped in either

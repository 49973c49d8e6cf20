"""The preprocessing cache: values, geometry, lesion metadata, atomicity, idempotence, reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sap_lightning.cache import (
    PreprocessParams,
    compute_body_mask,
    normalize_channels,
    open_cache,
    otsu_threshold,
    preprocess_dataset,
    resampled_grid,
)
from sap_lightning.cache import build as preprocess
from sap_lightning.core.errors import DatasetError
from sap_lightning.core.lesions import lesion_components
from tests.datasets import truncate, write_tiny_dataset

SHAPE = (20, 16, 12)
SPACING = (1.5, 1.5, 4.0)  # anisotropic, so axis-order mistakes show


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_tiny_dataset(
        tmp_path / "ds", n_cases=3, shape=SHAPE, spacing=SPACING, lesions_per_case=[1, 3, 5]
    )


def _percentile_reference(values: np.ndarray, q: float) -> float:
    """Linear-interpolation percentile written out by hand (numpy's default definition)."""
    ordered = np.sort(values.ravel().astype(np.float64))
    rank = q / 100.0 * (ordered.size - 1)
    below = int(np.floor(rank))
    above = min(below + 1, ordered.size - 1)
    return float(ordered[below] + (rank - below) * (ordered[above] - ordered[below]))


def _normalize_reference(channel: np.ndarray) -> np.ndarray:
    low, high = _percentile_reference(channel, 1), _percentile_reference(channel, 99)
    return (np.minimum(np.maximum(channel, low), high) - low) / (high - low)


# --------------------------------------------------------------------------- normalisation


def test_normalize_channels_matches_hand_reference_and_monai() -> None:
    from monai.transforms import ScaleIntensityRangePercentiles

    rng = np.random.default_rng(3)
    image = np.stack([rng.gamma(2.0, 50.0, (9, 8, 7)), rng.normal(10, 4, (9, 8, 7))])
    image[0, 0, 0, 0] = 1e6  # an outlier that the 99th percentile must clip
    normed, percentiles = normalize_channels(image)
    assert normed.dtype == np.float32
    for channel in range(2):
        np.testing.assert_allclose(
            percentiles[channel, 0], _percentile_reference(image[channel], 1)
        )
        np.testing.assert_allclose(
            percentiles[channel, 1], _percentile_reference(image[channel], 99)
        )
        np.testing.assert_allclose(normed[channel], _normalize_reference(image[channel]), atol=1e-6)
    monai = ScaleIntensityRangePercentiles(
        lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
    )(image)
    np.testing.assert_allclose(normed, np.asarray(monai), atol=1e-5)
    assert normed.min() == 0.0 and normed.max() == 1.0


def test_constant_channel_is_refused_and_flat_percentiles_become_zeros() -> None:
    with pytest.raises(ValueError, match="channel 0 is constant"):
        normalize_channels(np.full((1, 4, 4, 4), 7.0))
    almost = np.full((1, 10, 10, 10), 7.0)
    almost[0, 0, 0, 0] = 9.0  # not constant, but both percentiles are 7
    normed, percentiles = normalize_channels(almost)
    assert np.all(normed == 0.0)
    np.testing.assert_array_equal(percentiles, [[7.0, 7.0]])


def test_cache_normalises_the_whole_volume_not_a_patch(dataset: Path, tmp_path: Path) -> None:
    preprocess_dataset(dataset, tmp_path / "cache")
    case = open_cache(tmp_path / "cache").load("case001")
    for channel in range(2):
        raw = nib.load(dataset / f"imagesTr/case001_{channel:04d}.nii.gz").get_fdata()
        expected = _normalize_reference(raw)
        np.testing.assert_allclose(case.image[channel], expected, atol=1e-6)
        np.testing.assert_allclose(
            case.meta["percentiles"][channel],
            [_percentile_reference(raw, 1), _percentile_reference(raw, 99)],
        )
        # A patch normalised on its own would differ: the cache used the volume's percentiles.
        inside = (slice(7, 13), slice(6, 10), slice(4, 8))  # body only: other percentiles
        assert not np.allclose(_normalize_reference(raw[inside]), expected[inside], atol=0.05)


# --------------------------------------------------------------------------- lesions, classes


def test_lesion_metadata_matches_scipy_on_anisotropic_spacing(
    dataset: Path, tmp_path: Path
) -> None:
    preprocess_dataset(dataset, tmp_path / "cache")
    cache = open_cache(tmp_path / "cache")
    voxel_ml = np.prod(SPACING) / 1000.0
    for case_id, expected_count in [("case000", 1), ("case001", 3), ("case002", 5)]:
        label = np.asanyarray(nib.load(dataset / f"labelsTr/{case_id}.nii.gz").dataobj)
        components, count = ndimage.label(label > 0)  # default structure: 6-connectivity
        assert count == expected_count
        expected = set()
        for index, box in enumerate(ndimage.find_objects(components), start=1):
            voxels = int(np.sum(components == index))
            bbox = tuple(s.start for s in box) + tuple(s.stop for s in box)
            expected.add((voxels, round(voxels * voxel_ml, 9), bbox))
        case = cache.load(case_id)
        found = {(le.voxels, round(le.volume_ml, 9), le.bbox) for le in case.lesions}
        assert found == expected
        assert sorted(le.component_id for le in case.lesions) == list(range(1, count + 1))
        for lesion in case.lesions:  # the bbox holds exactly the lesion's voxels
            assert int(np.count_nonzero(case.label[lesion.slices])) == lesion.voxels


def test_lesion_components_respect_connectivity() -> None:
    label = np.zeros((6, 6, 6), np.uint8)
    label[1, 1, 1] = label[2, 2, 1] = 1  # diagonal neighbours: 2 lesions at 6, 1 at 18
    assert len(lesion_components(label, (1.0, 1.0, 1.0), connectivity=6)) == 2
    (merged,) = lesion_components(label, (2.0, 1.0, 0.5), connectivity=18)
    assert merged.voxels == 2 and merged.volume_ml == pytest.approx(2 * 1.0 / 1000)
    assert merged.bbox == (1, 1, 1, 3, 3, 2)


def test_skeleton_class_locations(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "sk", n_cases=2, task="skeleton", lesions_per_case=5)
    params = PreprocessParams(max_locations_per_class=3, seed=7)
    preprocess_dataset(root, tmp_path / "cache", params)
    case = open_cache(tmp_path / "cache").load("case000")
    assert case.lesions == []
    label = np.asarray(case.label)
    assert sorted(case.class_locations) == list(range(1, 10))
    for value, locations in case.class_locations.items():
        n_voxels = int(np.count_nonzero(label == value))
        assert locations.shape == (min(3, n_voxels), 3)
        assert len({tuple(p) for p in locations}) == len(locations)  # no repeats
        assert np.all(label[tuple(locations.T)] == value)
    first = {k: v.copy() for k, v in case.class_locations.items()}
    preprocess_dataset(root, tmp_path / "cache", params, force=True)  # seeded: same draw
    again = open_cache(tmp_path / "cache").load("case000").class_locations
    assert all(np.array_equal(first[k], again[k]) for k in first)


# --------------------------------------------------------------------------- body mask, geometry


def _box_phantom(shape=(30, 30, 20), air_noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Two channels: a body box (0.6) cut open at both ends of the slice axis, with a dark hole
    (lungs), in air whose second channel is Rician noise of scale ``air_noise`` (after percentile
    normalisation a diffusion image's air sits well above zero)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((2, *shape), np.float32)
    image[:, 5:25, 8:22, :] = 0.6
    image[:, 12:18, 12:18, :] = 0.0
    noise = np.hypot(*rng.normal(0.0, air_noise, (2, *shape))).astype(np.float32)
    image[1] = np.where(image[1] > 0, image[1], noise)
    return image


def _within(mask: np.ndarray, box: np.ndarray, margin: int) -> bool:
    """``box`` shrunk by one voxel lies inside ``mask``, which lies inside ``box`` grown by
    ``margin`` voxels (smoothing moves the edge by up to a voxel)."""
    cross = ndimage.generate_binary_structure(3, 1)
    inner = ndimage.binary_erosion(box, cross, iterations=1, border_value=1)
    outer = ndimage.binary_dilation(box, cross, iterations=margin)
    return bool(np.all(mask[inner]) and not np.any(mask[~outer]))


@pytest.mark.parametrize("air_noise", [0.0, 0.12])
def test_body_mask_fills_holes_drops_noise_and_dilates(air_noise: float) -> None:
    image = _box_phantom(air_noise=air_noise)
    image[:, 0, 0, 0] = 1.0  # a bright noise voxel in air: must be dropped
    mask = compute_body_mask(image, np.diag([1.0, 1.0, 5.0, 1.0]), dilation=1)
    assert mask[15, 15, 0] and mask[15, 15, 10]  # hole filled in every slice, ends included
    assert not mask[0, 0, 0] and not mask[29, 29, 10]
    box = np.zeros((30, 30, 20), bool)
    box[5:25, 8:22, :] = True
    assert _within(mask, box, margin=2)  # dilation 1 plus a voxel of smoothing


def test_a_fixed_threshold_lets_noisy_air_in_where_otsu_does_not() -> None:
    """Why the default threshold is Otsu's: the air of the second channel at Rician scale 0.12
    (mean 0.15) puts the mean channel near 0.075, which a fixed 0.05 lets into the mask."""
    image = _box_phantom(air_noise=0.12)
    affine = np.diag([1.0, 1.0, 5.0, 1.0])
    assert compute_body_mask(image, affine, threshold=0.05, dilation=0).mean() > 0.9
    otsu = compute_body_mask(image, affine, dilation=0)
    assert otsu.mean() == pytest.approx(20 * 14 / 900, abs=0.05)


def test_otsu_threshold_separates_two_levels() -> None:
    values = np.concatenate([np.full(700, 0.1), np.full(300, 0.8)]).reshape(10, 10, 10)
    threshold = otsu_threshold(values)
    assert 0.1 <= threshold < 0.8


def test_body_mask_keeps_an_arm_apart_from_the_trunk() -> None:
    """Parts of at least 1% of the largest are body (an arm beside the trunk); specks are not."""
    image = np.zeros((2, 40, 30, 20), np.float32)
    image[:, 5:25, 5:25, :] = 0.6  # trunk: 8000 voxels
    image[:, 30:34, 10:14, :] = 0.6  # arm: 320 voxels (4%), 5 voxels of air away
    image[:, 37:39, 27:29, 8:10] = 0.6  # speck: 8 voxels
    mask = compute_body_mask(image, np.diag([1.0, 1.0, 5.0, 1.0]), dilation=0)
    assert mask[15, 15, 10] and mask[32, 12, 10]
    assert not mask[38, 28, 9]


def test_body_mask_and_bbox_in_cache(dataset: Path, tmp_path: Path) -> None:
    preprocess_dataset(dataset, tmp_path / "cache")
    case = open_cache(tmp_path / "cache").load("case000")
    body = np.asarray(case.body_mask)
    assert body.dtype == np.uint8 and set(np.unique(body)) <= {0, 1}
    assert body[10, 8, 6] == 1  # the body centre
    label = np.asarray(case.label)
    assert np.all(body[label > 0] == 1)  # lesions lie inside the body
    nonzero = np.argwhere(body)
    assert case.meta["body_bbox"] == [*nonzero.min(axis=0), *(nonzero.max(axis=0) + 1)]


def test_resampling_updates_affine_and_keeps_the_field_of_view(
    dataset: Path, tmp_path: Path
) -> None:
    params = PreprocessParams(target_spacing=(3.0, 3.0, 2.0))
    preprocess_dataset(dataset, tmp_path / "cache", params)
    cache = open_cache(tmp_path / "cache")
    assert cache.target_spacing == (3.0, 3.0, 2.0)
    case = cache.load("case002")
    assert case.image.shape == (2, 10, 8, 24)
    assert case.label.shape == (10, 8, 24) and set(np.unique(case.label)) <= {0, 1}
    assert case.spacing == pytest.approx((3.0, 3.0, 2.0))
    old_affine = nib.load(dataset / "imagesTr/case002_0000.nii.gz").affine
    # The outer corners of the first and last voxels are the same physical points.
    for old_corner, new_corner in [
        ((-0.5,) * 3, (-0.5,) * 3),
        ((19.5, 15.5, 11.5), (9.5, 7.5, 23.5)),
    ]:
        np.testing.assert_allclose(
            case.affine @ [*new_corner, 1.0], old_affine @ [*old_corner, 1.0], atol=1e-9
        )
    assert case.image.min() >= 0.0 and case.image.max() <= 1.0
    # Volumes are measured with the new spacing.
    for lesion in case.lesions:
        assert lesion.volume_ml == pytest.approx(lesion.voxels * 18.0 / 1000.0)


def test_resampled_grid_is_identity_at_native_spacing() -> None:
    affine = np.diag([1.5, 1.5, 4.0, 1.0])
    shape, new_affine = resampled_grid((20, 16, 12), affine, (1.5, 1.5, 4.0))
    assert shape == (20, 16, 12)
    np.testing.assert_allclose(new_affine, affine)


# --------------------------------------------------------------------------- atomicity, idempotence


def test_crash_mid_case_leaves_no_valid_half_case_and_rerun_repairs(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_root = tmp_path / "cache"
    original = preprocess._save_array

    def crash_on_second_label(path: Path, array: np.ndarray) -> None:
        if path.name == preprocess.LABEL_FILE and path.parent.name.startswith(".case001"):
            raise OSError("disk full")
        original(path, array)

    monkeypatch.setattr(preprocess, "_save_array", crash_on_second_label)
    with pytest.raises(OSError, match="disk full"):
        preprocess_dataset(dataset, cache_root)
    cases = cache_root / preprocess.CASES_DIR
    assert sorted(p.name for p in cases.iterdir()) == ["case000"]  # no half case, no temp folder
    with pytest.raises(DatasetError, match=r"no cache\.json"):
        open_cache(cache_root)

    monkeypatch.setattr(preprocess, "_save_array", original)
    report = preprocess_dataset(dataset, cache_root)
    assert report.skipped == ["case000"] and report.written == ["case001", "case002"]
    assert open_cache(cache_root).case_ids == ["case000", "case001", "case002"]


def test_case_folder_without_valid_meta_is_rebuilt(dataset: Path, tmp_path: Path) -> None:
    cache_root = tmp_path / "cache"
    preprocess_dataset(dataset, cache_root)
    (cache_root / "cases/case001/meta.json").write_text("{truncated")
    with pytest.raises(
        DatasetError, match=r"case case001: .*case001/meta.json: missing or invalid"
    ):
        open_cache(cache_root)
    report = preprocess_dataset(dataset, cache_root)
    assert report.written == ["case001"] and report.skipped == ["case000", "case002"]
    open_cache(cache_root).load("case001")


def test_rerun_skips_touch_rebuilds_force_rebuilds_all(dataset: Path, tmp_path: Path) -> None:
    cache_root = tmp_path / "cache"
    first = preprocess_dataset(dataset, cache_root)
    assert first.written == ["case000", "case001", "case002"] and first.skipped == []
    images = {c: cache_root / f"cases/{c}/image.npy" for c in first.written}
    mtimes = {c: p.stat().st_mtime_ns for c, p in images.items()}

    second = preprocess_dataset(dataset, cache_root)
    assert second.written == [] and second.skipped == ["case000", "case001", "case002"]
    assert {c: p.stat().st_mtime_ns for c, p in images.items()} == mtimes

    source = dataset / "labelsTr/case001.nii.gz"
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    third = preprocess_dataset(dataset, cache_root)
    assert third.written == ["case001"] and third.skipped == ["case000", "case002"]
    assert images["case000"].stat().st_mtime_ns == mtimes["case000"]

    changed = preprocess_dataset(dataset, cache_root, PreprocessParams(upper_percentile=98.0))
    assert changed.written == ["case000", "case001", "case002"]  # parameters changed
    forced = preprocess_dataset(
        dataset, cache_root, PreprocessParams(upper_percentile=98.0), force=True
    )
    assert forced.written == ["case000", "case001", "case002"]


def test_removed_case_is_dropped_from_the_cache(dataset: Path, tmp_path: Path) -> None:
    cache_root = tmp_path / "cache"
    preprocess_dataset(dataset, cache_root)
    for path in [*dataset.glob("imagesTr/case002_*"), dataset / "labelsTr/case002.nii.gz"]:
        path.unlink()
    spec = json.loads((dataset / "dataset.json").read_text())
    spec["numTraining"] = 2
    (dataset / "dataset.json").write_text(json.dumps(spec))
    report = preprocess_dataset(dataset, cache_root)
    assert report.removed == ["case002"] and report.written == []
    assert open_cache(cache_root).case_ids == ["case000", "case001"]
    assert not (cache_root / "cases/case002").exists()


def test_parallel_workers_build_the_same_cache(dataset: Path, tmp_path: Path) -> None:
    preprocess_dataset(dataset, tmp_path / "serial")
    report = preprocess_dataset(dataset, tmp_path / "parallel", workers=2)
    assert sorted(report.written) == ["case000", "case001", "case002"]
    serial, parallel = open_cache(tmp_path / "serial"), open_cache(tmp_path / "parallel")
    for case_id in serial.case_ids:
        a, b = serial.load(case_id), parallel.load(case_id)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_array_equal(a.body_mask, b.body_mask)
        assert a.lesions == b.lesions


# --------------------------------------------------------------------------- reader and refusals


def test_reader_memory_maps_and_exposes_dataset_facts(dataset: Path, tmp_path: Path) -> None:
    spec = json.loads((dataset / "dataset.json").read_text())
    spec["subjects"] = {"case000": "S", "case001": "S"}
    (dataset / "dataset.json").write_text(json.dumps(spec))
    preprocess_dataset(dataset, tmp_path / "cache")
    cache = open_cache(tmp_path / "cache")
    assert cache.task == "lesion" and cache.labelled
    assert cache.labels == {"background": 0, "lesion": 1}
    assert cache.channel_names == ("T1", "b1000")
    assert cache.subjects == {"case000": "S", "case001": "S", "case002": "case002"}
    assert cache.dataset == dataset.resolve()
    case = cache.load("case001")
    assert isinstance(case.image, np.memmap) and not case.image.flags.writeable
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert case.subject_id == "S"
    assert case.spacing == pytest.approx(SPACING)
    in_memory = cache.load("case001", mmap=False)
    assert not isinstance(in_memory.image, np.memmap)
    np.testing.assert_array_equal(in_memory.image, case.image)


def test_unlabelled_dataset_is_cached_without_labels(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "ds", n_cases=2, labelled=False)
    preprocess_dataset(root, tmp_path / "cache")
    cache = open_cache(tmp_path / "cache")
    assert not cache.labelled
    case = cache.load("case000")
    assert case.label is None and case.lesions == [] and case.class_locations == {}


def test_open_cache_refuses_missing_stale_and_corrupt(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        open_cache(tmp_path / "nowhere")
    cache_root = tmp_path / "cache"
    preprocess_dataset(dataset, cache_root)

    image = cache_root / "cases/case002/image.npy"
    truncate(image)
    cache = open_cache(cache_root)
    with pytest.raises(DatasetError, match=r"cache case case002: .*case002/image.npy: corrupt"):
        cache.load("case002")
    (cache_root / "cases/case001/body.npy").unlink()
    with pytest.raises(DatasetError, match=r"cache case case001: .*case001/body.npy: missing"):
        cache.load("case001")

    description = json.loads((cache_root / "cache.json").read_text())
    description["format_version"] = 0
    (cache_root / "cache.json").write_text(json.dumps(description))
    with pytest.raises(DatasetError, match="format version 0"):
        open_cache(cache_root)


def test_preprocess_refuses_a_broken_dataset(dataset: Path, tmp_path: Path) -> None:
    truncate(dataset / "imagesTr/case000_0000.nii.gz")
    with pytest.raises(DatasetError, match=r"case case000: imagesTr/case000_0000.nii.gz"):
        preprocess_dataset(dataset, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_preprocess_refuses_foreign_folders(dataset: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(DatasetError, match="not a preprocessing cache"):
        preprocess_dataset(dataset, foreign)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]

    other = write_tiny_dataset(tmp_path / "other", n_cases=2)
    preprocess_dataset(other, tmp_path / "cache")
    with pytest.raises(DatasetError, match="belongs to dataset"):
        preprocess_dataset(dataset, tmp_path / "cache")
    report = preprocess_dataset(dataset, tmp_path / "cache", force=True)
    assert report.written == ["case000", "case001", "case002"]
    assert open_cache(tmp_path / "cache").dataset == dataset.resolve()

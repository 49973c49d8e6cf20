"""The image reader and the canonical RAS+ frame (``dataset/images.py``), against nibabel and
SimpleITK as references."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nibabel import orientations

from sap_lightning.dataset.images import (
    SourceFrame,
    canonical_shape,
    read_canonical,
    read_image,
    to_canonical,
)

SHAPE = (7, 5, 4)


def _volume(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Distinct values everywhere, so any wrong flip or transpose shows."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) * 1.5 - 20.0


def _ras_image() -> nib.Nifti1Image:
    affine = np.diag([1.5, 2.0, 4.0, 1.0])
    affine[:3, 3] = (-10.0, 30.0, 2.5)
    return nib.Nifti1Image(_volume(), affine)


def _reoriented(image: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    """The same world image stored in voxel order ``codes`` (nibabel's own re-orientation)."""
    current = orientations.io_orientation(image.affine)
    return image.as_reoriented(
        orientations.ornt_transform(current, orientations.axcodes2ornt(codes))
    )


ALL_ORIENTATIONS = [
    "".join(pair[0] if flip else pair[1] for pair, flip in zip(perm, flips))
    for perm in itertools.permutations((("R", "L"), ("A", "P"), ("S", "I")))
    for flips in itertools.product((True, False), repeat=3)
]


@pytest.mark.parametrize("codes", ALL_ORIENTATIONS)
def test_every_orientation_comes_back_to_the_same_canonical_array(codes: str) -> None:
    original = _ras_image()
    stored = _reoriented(original, codes)
    assert "".join(nib.aff2axcodes(stored.affine)) == codes
    array, affine = to_canonical(np.asarray(stored.dataobj), stored.affine)
    reference = nib.as_closest_canonical(stored)
    np.testing.assert_array_equal(array, np.asarray(reference.dataobj))
    np.testing.assert_allclose(affine, reference.affine)
    np.testing.assert_array_equal(array, np.asarray(original.dataobj))
    np.testing.assert_allclose(affine, original.affine)
    assert canonical_shape(stored.affine, stored.shape) == SHAPE
    # and back, exactly: the input's own voxel order, also with a leading channel axis
    frame = SourceFrame(stored.affine, stored.shape, None, "sform")
    np.testing.assert_array_equal(frame.from_canonical(array), np.asarray(stored.dataobj))
    stacked = frame.from_canonical(np.stack([array, -array]))
    np.testing.assert_array_equal(stacked[1], -np.asarray(stored.dataobj))
    assert frame.orientation == codes


def test_oblique_affine_takes_the_closest_axes_without_resampling() -> None:
    angle = np.deg2rad(20)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.5, 2.0, 4.0])  # mostly L, A, S
    stored = nib.Nifti1Image(_volume(), affine)
    array, canonical = to_canonical(np.asarray(stored.dataobj), stored.affine)
    reference = nib.as_closest_canonical(stored)
    np.testing.assert_array_equal(array, np.asarray(reference.dataobj))
    np.testing.assert_allclose(canonical, reference.affine)


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_itk_file_written_from_nifti_reads_like_the_nifti(tmp_path: Path, ending: str) -> None:
    nifti = tmp_path / "image.nii.gz"
    stored = _reoriented(_ras_image(), "PIL")
    nib.save(stored, nifti)
    itk = tmp_path / f"image{ending}"
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(itk))
    from_itk, itk_affine, itk_frame = read_canonical(itk)
    from_nifti, nifti_affine, nifti_frame = read_canonical(nifti)
    np.testing.assert_array_equal(from_itk, from_nifti)
    np.testing.assert_allclose(itk_affine, nifti_affine, atol=1e-5)
    np.testing.assert_allclose(itk_frame.affine, stored.affine, atol=1e-5)
    assert itk_frame.orientation == nifti_frame.orientation == "PIL"
    assert itk_frame.affine_source == "itk" and itk_frame.header is None


def test_qform_sform_disagreement_is_reported_and_the_sform_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = _ras_image()
    qform = image.affine.copy()
    qform[0, 3] += 50.0
    image.set_qform(qform, code=1)
    image.set_sform(image.affine, code=2)
    path = tmp_path / "disagree.nii.gz"
    nib.save(image, path)
    with caplog.at_level(logging.WARNING):
        loaded = read_image(path)
    assert loaded.affine_source == "sform"
    np.testing.assert_allclose(loaded.affine, nib.load(path).header.get_best_affine())
    np.testing.assert_allclose(loaded.affine[0, 3], -10.0)
    (record,) = [r for r in caplog.records if "qform and sform disagree" in r.getMessage()]
    assert str(path) in record.getMessage() and "using the sform" in record.getMessage()


def test_qform_is_used_when_the_sform_code_is_zero(tmp_path: Path, caplog) -> None:
    image = _ras_image()
    qform = image.affine.copy()
    qform[0, 3] += 50.0
    image.set_qform(qform, code=1)
    image.set_sform(image.affine, code=0)
    path = tmp_path / "qform.nii.gz"
    nib.save(image, path)
    with caplog.at_level(logging.WARNING):
        loaded = read_image(path)
    assert loaded.affine_source == "qform"
    np.testing.assert_allclose(loaded.affine, qform, atol=1e-4)
    assert not [r for r in caplog.records if "disagree" in r.getMessage()]


def test_read_canonical_refuses_a_4d_file(tmp_path: Path) -> None:
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 2), np.float32), np.eye(4)), path)
    with pytest.raises(ValueError, match="not a 3D volume"):
        read_canonical(path)
    assert read_image(path).data.shape == (*SHAPE, 2)

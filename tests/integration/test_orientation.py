"""One canonical frame: a case stored in any voxel order is cached and predicted identically,
and ``sap predict`` writes every output back in the input's own frame.

Copies are re-stored with nibabel (``as_reoriented``: same world geometry, other voxel order)
and compared in world coordinates after nibabel brings them back, independently of the library.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel import orientations

from sap_lightning.cache import open_cache, preprocess_dataset
from sap_lightning.cli import main
from sap_lightning.inference.outputs import case_paths
from tests.checkpoints import write_checkpoint
from tests.datasets import write_tiny_dataset

SHAPE = (24, 20, 16)
ORIENTATIONS = ("LPS", "RSA", "PIL")


def restore_as(source: Path, target: Path, codes: str) -> nib.Nifti1Image:
    """Re-store a NIfTI file in voxel order ``codes`` (same world image) with nibabel."""
    image = nib.load(source)
    current = orientations.io_orientation(image.affine)
    wanted = orientations.axcodes2ornt(tuple(codes))
    stored = image.as_reoriented(orientations.ornt_transform(current, wanted))
    assert "".join(nib.aff2axcodes(stored.affine)) == codes
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(stored, target)
    return stored


def predict(checkpoint: Path, input_dir: Path, out: Path) -> None:
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(input_dir)]
    assert main([*args, "--out", str(out), "--threshold", "0.5", "--no-progress"]) == 0


@pytest.fixture(scope="module")
def predictions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("orientation")
    dataset = write_tiny_dataset(root / "ds", n_cases=1, shape=SHAPE)
    checkpoint = write_checkpoint(root / "lesion.ckpt")
    folders = {"RAS": root / "in_RAS"}
    for channel in range(2):
        name = f"case000_{channel:04d}.nii.gz"
        folders["RAS"].mkdir(exist_ok=True)
        shutil.copy(dataset / "imagesTr" / name, folders["RAS"] / name)
        for codes in ORIENTATIONS:
            folders[codes] = root / f"in_{codes}"
            restore_as(dataset / "imagesTr" / name, folders[codes] / name, codes)
    outs = {}
    for codes, folder in folders.items():
        outs[codes] = root / f"out_{codes}"
        predict(checkpoint, folder, outs[codes])
    return {"root": root, "folders": folders, "outs": outs}


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_outputs_are_written_in_the_input_frame(predictions, codes: str) -> None:
    source = nib.load(predictions["folders"][codes] / "case000_0000.nii.gz")
    paths = case_paths(predictions["outs"][codes], "case000")
    for path in (paths.probability, paths.mask):
        out = nib.load(path)
        assert out.shape == source.shape
        np.testing.assert_allclose(out.affine, source.affine)
        assert nib.aff2axcodes(out.affine) == tuple(codes)


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_predictions_agree_in_world_coordinates(predictions, codes: str) -> None:
    for kind in ("probability", "mask"):
        reference = nib.load(getattr(case_paths(predictions["outs"]["RAS"], "case000"), kind))
        other = nib.as_closest_canonical(
            nib.load(getattr(case_paths(predictions["outs"][codes], "case000"), kind))
        )
        np.testing.assert_allclose(other.affine, reference.affine)
        np.testing.assert_array_equal(other.get_fdata(), reference.get_fdata())
    # The same lesions (centroids in scanner mm); ids follow the voxel order, so not compared.
    tables = []
    for c in ("RAS", codes):
        table = pd.read_csv(case_paths(predictions["outs"][c], "case000").lesions)
        centroids = [name for name in table.columns if name.startswith("centroid")]
        table = table.drop(columns=table.columns[0]).sort_values(centroids, ignore_index=True)
        tables.append(table)
    assert len(tables[0]) > 0
    pd.testing.assert_frame_equal(tables[0], tables[1])


def test_the_random_network_is_not_orientation_equivariant(predictions) -> None:
    """The agreement above is only evidence if feeding another voxel order changes the output."""
    checkpoint = predictions["root"] / "lesion.ckpt"
    raw = predictions["root"] / "raw_lps"
    raw.mkdir()
    for channel in range(2):
        name = f"case000_{channel:04d}.nii.gz"
        image = nib.load(predictions["folders"]["LPS"] / name)
        # The LPS voxels labelled as if they were RAS: the network sees the LPS voxel order.
        nib.save(
            nib.Nifti1Image(np.asarray(image.dataobj), np.diag([1.5, 1.5, 4.0, 1])), raw / name
        )
    predict(checkpoint, raw, predictions["root"] / "out_raw")
    naive = nib.load(case_paths(predictions["root"] / "out_raw", "case000").probability)
    reference = nib.load(case_paths(predictions["outs"]["LPS"], "case000").probability)
    assert not np.array_equal(naive.get_fdata(), reference.get_fdata())


# --------------------------------------------------------------------------- cache


def test_mixed_orientation_cohort_caches_the_same_canonical_arrays(tmp_path: Path) -> None:
    canonical = write_tiny_dataset(tmp_path / "canonical", n_cases=4, shape=(20, 16, 12))
    mixed = tmp_path / "mixed"
    shutil.copytree(canonical, mixed)
    stored = {"case000": "RAS"}
    for case, codes in zip(("case001", "case002", "case003"), ORIENTATIONS):
        stored[case] = codes
        for path in [*mixed.glob(f"imagesTr/{case}_*.nii.gz"), mixed / f"labelsTr/{case}.nii.gz"]:
            restore_as(path, path, codes)
    preprocess_dataset(canonical, tmp_path / "cache_canonical")
    preprocess_dataset(mixed, tmp_path / "cache_mixed")
    reference, other = (
        open_cache(tmp_path / "cache_canonical"),
        open_cache(tmp_path / "cache_mixed"),
    )
    for case, codes in stored.items():
        a, b = reference.load(case), other.load(case)
        np.testing.assert_array_equal(np.asarray(b.image), np.asarray(a.image))
        np.testing.assert_array_equal(np.asarray(b.label), np.asarray(a.label))
        np.testing.assert_array_equal(np.asarray(b.body_mask), np.asarray(a.body_mask))
        np.testing.assert_allclose(b.affine, a.affine)
        assert b.meta["spacing"] == a.meta["spacing"] == [1.5, 1.5, 4.0]
        assert b.meta["lesions"] == a.meta["lesions"]
        assert b.meta["source_orientation"] == codes
        assert a.meta["source_orientation"] == "RAS"


def test_outputs_keep_the_inputs_header_codes_and_units(tmp_path: Path) -> None:
    """Scanner-frame codes and units of the input's header carry over to every output image."""
    dataset = write_tiny_dataset(tmp_path / "ds", n_cases=1, shape=SHAPE)
    folder = tmp_path / "in"
    folder.mkdir()
    for channel in range(2):
        name = f"case000_{channel:04d}.nii.gz"
        image = nib.load(dataset / "imagesTr" / name)
        data = np.asanyarray(image.dataobj)
        header = image.header.copy()
        header.set_xyzt_units("mm", "sec")
        header["descrip"] = b"scanner export"
        stored = nib.Nifti1Image(data, image.affine, header)
        stored.set_sform(image.affine, code="scanner")
        stored.set_qform(image.affine, code="aligned")
        nib.save(stored, folder / name)
    out = tmp_path / "out"
    predict(write_checkpoint(tmp_path / "lesion.ckpt"), folder, out)
    paths = case_paths(out, "case000")
    for path in (paths.probability, paths.mask):
        written = nib.load(path).header
        assert int(written["sform_code"]) == 1 and int(written["qform_code"]) == 2
        assert written.get_xyzt_units() == ("mm", "sec")
        assert written["descrip"].tobytes().rstrip(b"\0") == b"scanner export"
    assert set(np.unique(np.asanyarray(nib.load(paths.mask).dataobj))) <= {0, 1}

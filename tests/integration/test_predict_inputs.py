"""``sap predict`` validates its input before any work, through the real command line.

Each broken input (files broken here with nibabel) must give exit status 2, one line on stderr
naming the case, the file and the problem, and no case output in the output folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sap_lightning.cli import main
from sap_lightning.inference.outputs import case_paths
from tests.checkpoints import write_checkpoint
from tests.datasets import write_tiny_dataset

SHAPE = (24, 20, 16)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    dataset = write_tiny_dataset(root / "ds", n_cases=1, shape=SHAPE)
    checkpoint = write_checkpoint(root / "lesion.ckpt")
    return {"root": root, "dataset": dataset, "checkpoint": checkpoint}


def _plain_folder(base: dict[str, Path], target: Path) -> Path:
    target.mkdir(parents=True)
    for path in (base["dataset"] / "imagesTr").glob("case000_*.nii.gz"):
        shutil.copy(path, target / path.name)
    return target


def _predict(checkpoint: Path, input_dir: Path, out: Path) -> int:
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(input_dir)]
    return main([*args, "--out", str(out), "--threshold", "0.5", "--no-progress"])


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def _with_nan(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data = data.copy()
    data[3, 4, 5] = np.nan
    return data, affine


def _shifted_283mm(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    affine = affine.copy()
    affine[0, 3] += 283.0
    return data, affine


def _mirrored(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    affine = affine.copy()
    affine[0, 0] *= -1  # same shape and origin, x axis pointing the other way
    return data, affine


def _four_d(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([data, data], axis=-1), affine


def _constant(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros_like(data), affine


@pytest.mark.parametrize(
    ("breakage", "problem"),
    [
        (_with_nan, "1 NaN/Inf voxels"),
        (_shifted_283mm, "affine differs from"),
        (_mirrored, "affine differs from"),
        (_four_d, "not a 3D volume: shape (24, 20, 16, 2)"),
        (_constant, "constant image (every voxel is 0)"),
        (None, "missing channel 1"),
    ],
    ids=["nan", "shifted", "mirrored", "4d", "constant", "missing"],
)
def test_broken_b1000_in_a_plain_folder_is_refused(
    base, tmp_path: Path, capsys, breakage, problem: str
) -> None:
    folder = _plain_folder(base, tmp_path / "imagesTs")
    b1000 = folder / "case000_0001.nii.gz"
    if breakage is None:
        b1000.unlink()
    else:
        image = nib.load(b1000)
        _rewrite(b1000, *breakage(image.get_fdata(dtype=np.float32), image.affine))
    out = tmp_path / "out"
    assert _predict(base["checkpoint"], folder, out) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "case case000" in lines[0] and "case000_0001.nii.gz" in lines[0]
    assert problem in lines[0]
    assert not out.exists()


def test_extra_channel_file_is_refused(base, tmp_path: Path, capsys) -> None:
    folder = _plain_folder(base, tmp_path / "imagesTs")
    shutil.copy(folder / "case000_0001.nii.gz", folder / "case000_0002.nii.gz")
    assert _predict(base["checkpoint"], folder, tmp_path / "out") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "case case000: case000_0002.nii.gz: extra channel 2" in line
    assert not (tmp_path / "out").exists()


def test_constant_channel_in_a_dataset_is_refused(base, tmp_path: Path, capsys) -> None:
    dataset = tmp_path / "ds"
    shutil.copytree(base["dataset"], dataset)
    t1 = dataset / "imagesTr" / "case000_0000.nii.gz"
    _rewrite(t1, np.full(SHAPE, 7.0, np.float32), nib.load(t1).affine)
    assert _predict(base["checkpoint"], dataset, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "case case000: imagesTr/case000_0000.nii.gz: constant image (every voxel is 7)" in err
    assert not (tmp_path / "out").exists()


def test_channels_named_in_another_order_are_reordered_by_name(base, tmp_path: Path) -> None:
    swapped = tmp_path / "swapped"
    shutil.copytree(base["dataset"], swapped)
    images = swapped / "imagesTr"
    (images / "case000_0000.nii.gz").rename(images / "tmp.nii.gz")
    (images / "case000_0001.nii.gz").rename(images / "case000_0000.nii.gz")
    (images / "tmp.nii.gz").rename(images / "case000_0001.nii.gz")
    spec = json.loads((swapped / "dataset.json").read_text())
    spec["channel_names"] = {"0": "b1000", "1": "T1"}
    (swapped / "dataset.json").write_text(json.dumps(spec))
    assert _predict(base["checkpoint"], base["dataset"], tmp_path / "natural") == 0
    assert _predict(base["checkpoint"], swapped, tmp_path / "reordered") == 0
    natural = case_paths(tmp_path / "natural", "case000").probability
    reordered = case_paths(tmp_path / "reordered", "case000").probability
    np.testing.assert_array_equal(nib.load(reordered).get_fdata(), nib.load(natural).get_fdata())
    # and the order matters to this network: the same files taken by position differ
    by_position = _plain_folder({"dataset": swapped}, tmp_path / "by_position")
    assert _predict(base["checkpoint"], by_position, tmp_path / "positional") == 0
    positional = case_paths(tmp_path / "positional", "case000").probability
    assert not np.array_equal(nib.load(positional).get_fdata(), nib.load(natural).get_fdata())


def test_another_channel_set_is_refused(base, tmp_path: Path, capsys) -> None:
    dataset = tmp_path / "t2"
    shutil.copytree(base["dataset"], dataset)
    spec = json.loads((dataset / "dataset.json").read_text())
    spec["channel_names"] = {"0": "T2", "1": "b1000"}
    (dataset / "dataset.json").write_text(json.dumps(spec))
    assert _predict(base["checkpoint"], dataset, tmp_path / "out") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "dataset.json: channel_names ['T2', 'b1000'] differ from the model's" in line
    assert line.endswith("(missing T1; not a model input T2)")
    assert not (tmp_path / "out").exists()


def test_spacing_off_the_training_spacing_is_a_warning_naming_both(
    base, tmp_path: Path, caplog
) -> None:
    checkpoint = write_checkpoint(tmp_path / "coarse.ckpt", spacing=(4.5, 4.5, 9.0))
    with caplog.at_level(logging.WARNING):
        assert _predict(checkpoint, base["dataset"], tmp_path / "out") == 0
    (message,) = [r.getMessage() for r in caplog.records if "training spacing" in r.getMessage()]
    assert "case000" in message and "(1.5, 1.5, 4.0)" in message and "(4.5, 4.5, 9.0)" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # within 5%: silent
        near = write_checkpoint(tmp_path / "near.ckpt", spacing=(1.55, 1.45, 4.1))
        assert _predict(near, base["dataset"], tmp_path / "out_near") == 0
    assert not [r for r in caplog.records if "training spacing" in r.getMessage()]


def test_network_output_with_nan_is_an_error_naming_the_case(base, tmp_path: Path, capsys) -> None:
    def poison(state: dict[str, torch.Tensor]) -> None:
        for tensor in state.values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))

    checkpoint = write_checkpoint(tmp_path / "nan.ckpt", edit_weights=poison)
    out = tmp_path / "out"
    assert _predict(checkpoint, base["dataset"], out) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "case case000" in line and "NaN/Inf probabilities" in line and "nan.ckpt" in line
    paths = case_paths(out, "case000")
    assert not any(p.exists() for p in (paths.mask, paths.probability, paths.summary))

"""`sap skeleton-labels`: public segmenters' label maps -> the ten skeleton labels.

The label maps are painted with each tool's real label ids (read off the tools' own tables:
TotalSegmentator map_to_binary.py, TotalVibeSegmentator's and MRSegmentator's READMEs), and the
expected skeleton values are worked out by hand here, independently of the library's mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sap_lightning.cli import main
from tests.datasets import affine_for, save

SHAPE = (8, 8, 40)
AFFINE = affine_for((3.0, 3.0, 4.0), origin=(-12.0, -12.0, -80.0))

# tool -> {real label id: hand-worked skeleton value}; 0 = stays background.
PAINT: dict[str, dict[int, int]] = {
    "total_mr": {
        5: 0,  # liver
        18: 4,  # sacrum
        19: 0,  # vertebrae (no level)
        30: 6,  # humerus_left
        33: 7,  # scapula_right
        34: 8,  # clavicula_left
        37: 5,  # femur_right
        38: 4,  # hip_left
        39: 4,  # hip_right
        41: 0,  # gluteus_maximus_right
    },
    "vertebrae_mr": {
        1: 4,  # sacrum
        2: 3,  # vertebrae_L5
        5: 3,  # vertebrae_L2
        7: 2,  # vertebrae_T12
        12: 2,  # vertebrae_T7
        18: 2,  # vertebrae_T1
        19: 1,  # vertebrae_C7
        23: 1,  # vertebrae_C3
        25: 1,  # vertebrae_C1
    },
    "totalvibeseg": {
        5: 0,  # liver
        23: 4,  # sacrum
        42: 6,  # humerus_left
        45: 7,  # scapula_right
        47: 8,  # clavicula_right
        48: 5,  # femur_left
        51: 4,  # hip_right
        63: 9,  # sternum
        64: 0,  # costal_cartilages
        69: 0,  # vertebra_body
        72: 0,  # bone_other
    },
    "mrsegmentator": {
        24: 0,  # urinary_bladder
        25: 0,  # spine
        26: 4,  # sacrum
        27: 4,  # left_hip
        28: 4,  # right_hip
        30: 5,  # right_femur
        35: 0,  # left_gluteus_maximus
    },
}
MISSING = {
    "total_mr": ["cervical_spine", "thoracic_spine", "lumbar_spine", "sternum"],
    "vertebrae_mr": ["femurs", "humeri", "scapulae", "clavicles", "sternum"],
    "totalvibeseg": ["cervical_spine", "thoracic_spine", "lumbar_spine"],
    "mrsegmentator": [
        "cervical_spine",
        "thoracic_spine",
        "lumbar_spine",
        "humeri",
        "scapulae",
        "clavicles",
        "sternum",
    ],
}


def _painted(ids: list[int], offset: int = 0) -> np.ndarray:
    """One 2-slice band per id along the long axis (``offset`` shifts the bands)."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    for k, label_id in enumerate(ids):
        z = 2 * k + offset
        labels[2:6, 2:6, z : z + 2] = label_id
    return labels


def _images(folder: Path, cases: list[str]) -> None:
    rng = np.random.default_rng(0)
    for case in cases:
        for channel in (0, 1):
            data = rng.random(SHAPE).astype(np.float32)
            save(folder / f"{case}_{channel:04d}.nii.gz", data, AFFINE)


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.mark.parametrize("tool", sorted(PAINT))
def test_each_tool_maps_to_the_hand_worked_regions(
    tool: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _images(tmp_path / "images", ["a", "b"])
    ids = list(PAINT[tool])
    for k, case in enumerate(["a", "b"]):
        save(tmp_path / "seg" / f"{case}.nii.gz", _painted(ids, offset=k), AFFINE)
    out = tmp_path / "ds"
    argv = ["skeleton-labels", str(out), "--tool", tool, "--labels", str(tmp_path / "seg")]
    assert main([*argv, "--images", str(tmp_path / "images")]) == 0
    printed = capsys.readouterr().out
    assert ("regions missing" in printed) == bool(MISSING[tool])
    for k, case in enumerate(["a", "b"]):
        expected = np.zeros(SHAPE, dtype=np.uint8)
        for j, label_id in enumerate(ids):
            expected[2:6, 2:6, 2 * j + k : 2 * j + k + 2] = PAINT[tool][label_id]
        got = _read(out / "labelsTr" / f"{case}.nii.gz")
        np.testing.assert_array_equal(got, expected)
        assert np.allclose(nib.load(out / "labelsTr" / f"{case}.nii.gz").affine, AFFINE)
        # The images are the inputs, byte for byte.
        for channel in (0, 1):
            name = f"{case}_{channel:04d}.nii.gz"
            assert (out / "imagesTr" / name).read_bytes() == (
                tmp_path / "images" / name
            ).read_bytes()
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["regions_missing"] == MISSING[tool]
    assert spec["label_sources"][0]["tool"] == tool
    assert len(spec["label_sources"][0]["commit"]) == 40
    for region in MISSING[tool]:
        assert region in printed
    assert main(["check-data", str(out)]) == 0
    assert "OK: 2 cases of 2 subjects, task skeleton" in capsys.readouterr().out


def test_total_mr_plus_vertebrae_mr_reoriented_and_mrsegmentator_names(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two sources merge (later wins), the second stored in another voxel order and named
    ``<case>_0000_seg``; only the sternum is left missing."""
    _images(tmp_path / "images", ["p1"])
    total = np.zeros(SHAPE, dtype=np.uint8)
    total[1:7, 1:7, 0:10] = 38  # hip_left
    total[1:7, 1:7, 30:40] = 19  # vertebrae: no level
    save(tmp_path / "total" / "p1.nii.gz", total, AFFINE)
    vert = np.zeros(SHAPE, dtype=np.uint8)
    vert[2:6, 2:6, 8:12] = 1  # sacrum, overlapping the hip band at z 8-9
    vert[2:6, 2:6, 30:34] = 5  # vertebrae_L2 inside total_mr's unlevelled spine
    vert[2:6, 2:6, 36:40] = 21  # vertebrae_C5
    # Store it as PIL-like: axes permuted and flipped, with the matching affine.
    ornt = nib.orientations.axcodes2ornt(("P", "S", "L"))
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    stored = nib.orientations.apply_orientation(vert, transform)
    stored_affine = AFFINE @ nib.orientations.inv_ornt_aff(transform, SHAPE)
    save(tmp_path / "vert" / "p1_0000_seg.nii.gz", stored.astype(np.uint8), stored_affine)
    assert nib.aff2axcodes(stored_affine) == ("P", "S", "L")

    out = tmp_path / "ds"
    argv = ["skeleton-labels", str(out), "--images", str(tmp_path / "images")]
    argv += ["--tool", "total_mr", "--labels", str(tmp_path / "total")]
    argv += ["--tool", "vertebrae_mr", "--labels", str(tmp_path / "vert")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    expected = np.zeros(SHAPE, dtype=np.uint8)
    expected[1:7, 1:7, 0:10] = 4
    expected[2:6, 2:6, 8:12] = 4
    expected[2:6, 2:6, 30:34] = 3
    expected[2:6, 2:6, 36:40] = 1
    np.testing.assert_array_equal(_read(out / "labelsTr" / "p1.nii.gz"), expected)
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["regions_missing"] == ["sternum"]
    assert [s["tool"] for s in spec["label_sources"]] == ["total_mr", "vertebrae_mr"]
    assert "regions missing (no source segments them; they stay background): sternum" in printed
    assert main(["check-data", str(out)]) == 0


def test_totalsegmentator_mask_folders(tmp_path: Path) -> None:
    """Without ``--ml`` TotalSegmentator writes one binary mask per structure."""
    _images(tmp_path / "images", ["c"])
    masks = {"femur_left": (0, 5), "scapula_left": (10, 7), "liver": (20, 0), "sacrum": (30, 4)}
    for name, (z, _value) in masks.items():
        mask = np.zeros(SHAPE, dtype=np.uint8)
        mask[:, :, z : z + 3] = 1
        save(tmp_path / "seg" / "c" / f"{name}.nii.gz", mask, AFFINE)
    out = tmp_path / "ds"
    argv = ["skeleton-labels", str(out), "--tool", "total_mr", "--labels", str(tmp_path / "seg")]
    assert main([*argv, "--images", str(tmp_path / "images")]) == 0
    expected = np.zeros(SHAPE, dtype=np.uint8)
    for z, value in masks.values():
        expected[:, :, z : z + 3] = value
    np.testing.assert_array_equal(_read(out / "labelsTr" / "c.nii.gz"), expected)


def _run_failing(tmp_path: Path, capsys: pytest.CaptureFixture, tool: str = "total_mr") -> str:
    out = tmp_path / "ds"
    argv = ["skeleton-labels", str(out), "--tool", tool, "--labels", str(tmp_path / "seg")]
    assert main([*argv, "--images", str(tmp_path / "images")]) == 2
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]
    return capsys.readouterr().err


def test_wrong_tool_values_are_refused_naming_case_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _images(tmp_path / "images", ["a", "b"])
    save(tmp_path / "seg" / "a.nii.gz", _painted([18, 38]), AFFINE)
    save(tmp_path / "seg" / "b.nii.gz", _painted([18, 63]), AFFINE)  # 63: TotalVibeSeg's sternum
    err = _run_failing(tmp_path, capsys)
    assert err.count("\n") == 1
    assert "case b:" in err and "b.nii.gz" in err and "63" in err and "wrong --tool?" in err


def test_label_on_another_grid_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _images(tmp_path / "images", ["a"])
    save(tmp_path / "seg" / "a.nii.gz", _painted([18])[:, :, :20], AFFINE)
    err = _run_failing(tmp_path, capsys)
    assert "case a:" in err and "is not the T1's" in err and "resample" in err


def test_missing_and_stray_label_maps_are_listed_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _images(tmp_path / "images", ["a", "b"])
    save(tmp_path / "seg" / "a.nii.gz", _painted([18]), AFFINE)
    save(tmp_path / "seg" / "zz.nii.gz", _painted([18]), AFFINE)
    (tmp_path / "images" / "b_0001.nii.gz").unlink()
    err = _run_failing(tmp_path, capsys)
    assert "case b:" in err and "missing b1000 image" in err
    assert "missing total_mr label map" in err
    assert "zz.nii.gz: label map of no case" in err


def test_command_tool_names_match_the_tables() -> None:
    from sap_lightning.commands.labels import _TOOLS
    from sap_lightning.dataset.skeleton_labels import TOOLS

    assert set(_TOOLS) == set(TOOLS)

"""``sap make-phantoms`` through the real command line."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from sap_lightning.cli import main
from sap_lightning.core.io import read_json
from sap_lightning.dataset import layout

TINY = ["--shape", "64", "64", "128", "--spacing", "4.5", "4.5", "9"]


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_writes_both_datasets(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main(["make-phantoms", str(out), "--healthy", "2", "--patients", "2", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "2 healthy scans" in printed and "2 patients" in printed

    assert _files(out / "skeleton") == [
        "dataset.json",
        "imagesTr/healthy_000_0000.nii.gz",
        "imagesTr/healthy_000_0001.nii.gz",
        "imagesTr/healthy_001_0000.nii.gz",
        "imagesTr/healthy_001_0001.nii.gz",
        "labelsTr/healthy_000.nii.gz",
        "labelsTr/healthy_001.nii.gz",
        "tissuesTr/healthy_000.nii.gz",
        "tissuesTr/healthy_001.nii.gz",
        "tissuesTr/tissues.json",
    ]
    assert _files(out / "lesion") == [
        "dataset.json",
        "imagesTr/patient_000_0000.nii.gz",
        "imagesTr/patient_000_0001.nii.gz",
        "imagesTr/patient_001_0000.nii.gz",
        "imagesTr/patient_001_0001.nii.gz",
        "labelsTr/patient_000.nii.gz",
        "labelsTr/patient_001.nii.gz",
        "skeletonTr/patient_000.nii.gz",
        "skeletonTr/patient_001.nii.gz",
        "tissuesTr/patient_000.nii.gz",
        "tissuesTr/patient_001.nii.gz",
        "tissuesTr/tissues.json",
    ]
    assert "mimics x1: " in printed
    spec = read_json(out / "skeleton" / layout.DATASET_JSON)
    assert spec["labels"] == layout.SKELETON_LABELS and spec["numTraining"] == 2
    image = nib.load(out / "lesion" / "imagesTr" / "patient_001_0001.nii.gz")
    assert image.shape == (64, 64, 128)
    np.testing.assert_allclose(image.header.get_zooms(), (4.5, 4.5, 9.0))


def test_mimics_knob_reaches_the_datasets_and_check_data_passes(tmp_path, capsys):
    out = tmp_path / "cohort"
    args = ["make-phantoms", str(out), "--healthy", "1", "--patients", "2", *TINY]
    assert main([*args, "--mimics", "0"]) == 0
    assert "mimics x0: 0 drawn" in capsys.readouterr().out
    spec = read_json(out / "lesion" / layout.DATASET_JSON)
    assert spec["phantom"]["mimics"] == 0.0
    assert all(not counts for counts in spec["phantom"]["mimic_counts"].values())
    assert main([*args, "--mimics", "2.5", "--overwrite"]) == 0
    spec = read_json(out / "lesion" / layout.DATASET_JSON)
    assert spec["phantom"]["mimics"] == 2.5
    drawn = spec["phantom"]["mimic_counts"]["patient_000"]
    assert drawn["lymph_node"] > 53 and drawn["dorsal_root_ganglion"] > 20
    capsys.readouterr()
    for dataset in ("skeleton", "lesion"):
        assert main(["check-data", str(out / dataset)]) == 0
    with pytest.raises(SystemExit) as refused:
        main([*args, "--mimics", "-1", "--overwrite"])
    assert refused.value.code == 2
    assert "--mimics" in capsys.readouterr().err


def test_help_lists_the_options():
    result = subprocess.run(
        [sys.executable, "-m", "sap_lightning", "make-phantoms", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in (
        "--healthy",
        "--patients",
        "--seed",
        "--size",
        "--shape",
        "--overwrite",
        "--mimics",
    ):
        assert option in result.stdout


def test_rerun_refuses_to_replace_without_overwrite(tmp_path, capsys):
    out = tmp_path / "cohort"
    args = ["make-phantoms", str(out), "--healthy", "1", "--patients", "1", *TINY]
    assert main(args) == 0
    (out / "my_notes.txt").write_text("keep me")
    label = out / "lesion" / "labelsTr" / "patient_000.nii.gz"
    before = label.read_bytes()
    capsys.readouterr()

    assert main([*args, "--seed", "3"]) == 2
    error = capsys.readouterr().err
    assert "already exist" in error and "--overwrite" in error
    assert label.read_bytes() == before

    assert main([*args, "--seed", "3", "--overwrite"]) == 0
    assert label.read_bytes() != before
    assert (out / "my_notes.txt").read_text() == "keep me"


def test_reuse_keeps_the_same_cohort_and_redraws_another(tmp_path, capsys):
    """``--reuse`` (``make data``): the same settings keep the files; another seed draws the
    cohort again in place; with ``--overwrite`` it is a usage error."""
    out = tmp_path / "cohort"
    args = ["make-phantoms", str(out), "--healthy", "1", "--patients", "1", *TINY, "--reuse"]
    assert main(args) == 0
    label = out / "lesion" / "labelsTr" / "patient_000.nii.gz"
    before, stamp = label.read_bytes(), label.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "reusing the cohort" in capsys.readouterr().out
    assert label.stat().st_mtime_ns == stamp
    assert main([*args, "--seed", "3"]) == 0
    assert label.read_bytes() != before
    assert read_json(out / "lesion" / layout.DATASET_JSON)["phantom"]["seed"] == 3
    with pytest.raises(SystemExit):
        main([*args, "--overwrite"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shape", "64", "64", "128"], "together"),
        (["--size", "small", "--spacing", "3", "3", "6"], "not both"),
        (["--healthy", "0"], "at least one"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, extra, message):
    assert main(["make-phantoms", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

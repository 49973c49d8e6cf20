"""A trained network sees the same case through ``sap import-dicom`` as from the phantom's files.

The skeleton network is trained through the real command line on a small healthy cohort; the
phantom patient is written once as plain NIfTI files and once as a scanner's DICOM exam
(``tests/dicom_exams.py``: overlapping stations with their own gains, DWI at half the in-plane
resolution with thicker slices). The plain files hold the b1000 image at the DWI's resolution
(a Gaussian of the DWI voxel's FWHM), as the scanner acquired it, so the comparison measures
the import (stations, gains, geometry, resampling) and not the acquisition's resolution.
``sap predict`` maps the skeleton of both; the two bone masks must agree, and the network must
have learned (its mask overlaps the phantom's skeleton; 400 steps gave a Dice of 0.13), so
agreement cannot come from two empty or two random masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sap_lightning.cli import main
from sap_lightning.dataset.layout import affine_from_spacing
from sap_lightning.synthetic import SIZES, SKELETON_CLASSES, generate_patient_case
from tests.checkpoints import write_checkpoint
from tests.datasets import save
from tests.dicom_exams import ExamSpec, write_dicom_exam

TRAINING_STEPS = 2500
"""Enough for a Dice of about 0.7 against the phantom's skeleton on the tiny grid and an
agreement above 0.9 in either memory layout (1500 steps left 0.89 in the channels-last one)."""
PRETRAIN_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "cpu" / "pretrain.yaml"
DWI_FWHM = (2.0, 2.0, 1.5)
"""The DWI voxel of the default axial exam in T1 voxels."""


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def _bone(predictions: Path) -> np.ndarray:
    """The predicted bone in RAS voxel order: the import writes the scanner's own axis order
    (LPS for an axial exam), the phantom's files are RAS."""
    image = nib.as_closest_canonical(nib.load(predictions / "skeleton" / "pat1.nii.gz"))
    return np.asarray(image.dataobj) > 0


@pytest.mark.learning
@pytest.mark.slow
def test_a_trained_network_predicts_the_imported_case_as_the_original(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    assert main(["make-phantoms", str(cohort), "--healthy", "6", "--patients", "1",
                 "--size", "tiny"]) == 0  # fmt: skip
    run = tmp_path / "skeleton_run"
    assert main([
        "pretrain", "--config", str(PRETRAIN_CONFIG),
        f"data.dataset={cohort / 'skeleton'}", f"run_dir={run}", "logger=csv",
        f"trainer.max_steps={TRAINING_STEPS}", "trainer.enable_progress_bar=false",
        "data.num_workers=0",
    ]) == 0  # fmt: skip

    shape, spacing = SIZES["tiny"]
    affine = affine_from_spacing(spacing)
    case = generate_patient_case(0, 1, shape, spacing)
    original = tmp_path / "original"
    save(original / "pat1_0000.nii.gz", case.t1, affine)
    sigma = [fwhm / 2.3548 for fwhm in DWI_FWHM]
    save(original / "pat1_0001.nii.gz", ndimage.gaussian_filter(case.b1000, sigma), affine)
    write_dicom_exam(tmp_path / "exam" / "pat1", case.t1, case.b1000, affine, ExamSpec(),
                     body=case.maps.tissue > 0)  # fmt: skip
    imported = tmp_path / "imported"
    assert main(["import-dicom", str(tmp_path / "exam"), str(imported)]) == 0

    # Any lesion network will do: only the skeleton map is compared.
    lesion_run = tmp_path / "lesion_run"
    write_checkpoint(lesion_run / "checkpoints" / "last.ckpt", spacing=spacing)
    (lesion_run / "threshold.json").write_text(json.dumps({"threshold": 0.5}))
    masks = {}
    for name, folder in (("original", original), ("imported", imported)):
        out = tmp_path / f"predictions_{name}"
        assert main(["predict", "--checkpoint", str(lesion_run), "--skeleton-checkpoint",
                     str(run), "--input", str(folder), "--out", str(out), "--no-progress"]) == 0  # fmt: skip
        masks[name] = _bone(out)

    truth = np.isin(case.maps.region, list(SKELETON_CLASSES.values()))
    assert masks["original"].any() and masks["imported"].any()
    assert _dice(masks["original"], truth) >= 0.4, "the skeleton network did not learn"
    assert _dice(masks["imported"], masks["original"]) >= 0.9

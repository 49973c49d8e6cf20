"""Threshold tuning decides on patients with lesions and never picks a blob threshold.

Worked by hand on five patients: p0 and p1 have one lesion (probability 0.6 inside it); the
lesion-free patients q0-q2 each hold a b1000-bright distractor at probability 0.6; p1 also has a
faint haze of 0.2 over the whole volume (a blob at thresholds <= 0.2).
"""

from __future__ import annotations

import numpy as np

from sap_lightning.core.io import read_json
from sap_lightning.dataset.layout import affine_from_spacing, label_path, save_nifti
from sap_lightning.evaluation.predictions import tune_on_predictions

SPACING = (2.0, 2.0, 4.0)
SHAPE = (24, 24, 12)
GRID = (0.1, 0.2, 0.3, 0.5, 0.7)


def _write(root, case_id: str, label: np.ndarray, prob: np.ndarray) -> None:
    affine = affine_from_spacing(SPACING)
    save_nifti(label_path(root / "dataset", case_id), label, affine)
    save_nifti(root / "pred" / "probabilities" / f"{case_id}.nii.gz", prob, affine)


def _cohort(root) -> list[str]:
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[4:8, 4:8, 3:6] = 1
    distractor = np.zeros(SHAPE, np.float32)
    distractor[15:19, 15:19, 6:9] = 0.6
    for case_id in ("p0", "p1"):
        prob = np.where(lesion > 0, 0.6, 0.2 if case_id == "p1" else 0.0).astype(np.float32)
        _write(root, case_id, lesion, prob)
    for case_id in ("q0", "q1", "q2"):
        _write(root, case_id, np.zeros(SHAPE, np.uint8), distractor)
    return ["p0", "p1", "q0", "q1", "q2"]


def test_patients_with_lesions_decide_and_blob_thresholds_are_not_eligible(tmp_path) -> None:
    from sap_lightning.evaluation.predictions import EvaluationSettings

    cases = _cohort(tmp_path)
    choice = tune_on_predictions(
        tmp_path / "pred", tmp_path / "dataset", cases, EvaluationSettings(thresholds=GRID)
    )
    # Lesion patients: F2 = 1 at every threshold up to 0.5 (found, no false positive), 0 at 0.7.
    # At 0.1 and 0.2 p1's haze covers the volume: median predicted/true volume is
    # (1 + 24*24*12/48) / 2 = 72.5 > 10, so those thresholds are not eligible -> 0.3.
    # Had the three clean-above-0.6 lesion-free patients voted, 0.7 (median F2 1) would win.
    assert choice.threshold == 0.3
    assert choice.cases == ["p0", "p1"]
    assert choice.settings["lesion_free_patients_left_out"] == ["q0", "q1", "q2"]
    assert choice.settings["thresholds_with_implausible_volume"] == [0.1, 0.2]
    assert choice.median_f2 == 1.0


def test_the_cli_records_how_the_threshold_was_chosen(tmp_path) -> None:
    from sap_lightning.cli import main

    cases = _cohort(tmp_path)
    out = tmp_path / "tuned"
    args = ["evaluate", "--predictions", str(tmp_path / "pred"), "--dataset",
            str(tmp_path / "dataset"), "--cases", ",".join(cases), "--thresholds",
            ",".join(map(str, GRID)), "--out", str(out), "--tune"]  # fmt: skip
    assert main(args) == 0
    saved = read_json(out / "threshold.json")
    assert saved["threshold"] == 0.3
    assert saved["settings"]["deciding_patients"] == "patients with lesions"


def test_a_tuning_set_without_lesions_is_refused(tmp_path) -> None:
    """Lesion-free patients score F2 = 1 at any high threshold: tuning on them alone would pick
    the top of the grid, so the command refuses and names the cases."""
    import pytest

    from sap_lightning.core.errors import DatasetError
    from sap_lightning.evaluation.predictions import EvaluationSettings

    _cohort(tmp_path)
    with pytest.raises(DatasetError, match=r"none of the 3 threshold-tuning cases \(q0, q1, q2\)"):
        tune_on_predictions(
            tmp_path / "pred",
            tmp_path / "dataset",
            ["q0", "q1", "q2"],
            EvaluationSettings(thresholds=GRID),
        )

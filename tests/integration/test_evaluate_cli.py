"""``sap evaluate`` and ``sap compare`` through the real command line on a tiny dataset."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sap_lightning.cli import main
from sap_lightning.dataset.layout import affine_from_spacing, label_path, save_nifti
from sap_lightning.evaluation.threshold import load_threshold
from sap_lightning.metrics import binarize, lesion_detection, lesion_scores

SPACING = (1.5, 2.0, 4.0)
SHAPE = (30, 26, 12)
CASES = ["p0", "p1", "p2", "p3"]


def _case(seed: int, blur: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")
    extent = np.array(SHAPE) * np.array(SPACING)
    gt = np.zeros(SHAPE, dtype=np.uint8)
    prob = np.zeros(SHAPE, dtype=np.float32)
    for _ in range(3):
        center = rng.uniform(0.2, 0.8, 3) * extent
        radii = rng.uniform(3.5, 8.0, 3)
        gt[sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1] = 1
        moved = center + rng.normal(0, blur, 3)
        d2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, moved, radii))
        prob = np.maximum(prob, rng.uniform(0.4, 1.0) * np.exp(-d2))
    center = rng.uniform(0.1, 0.9, 3) * extent
    prob = np.maximum(prob, 0.45 * np.exp(-sum(((g - c) / 4) ** 2 for g, c in zip(grid, center))))
    return prob.astype(np.float32), gt


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A dataset with labels and two prediction folders (a sharper and a blurrier model)."""
    root = tmp_path_factory.mktemp("study")
    affine = affine_from_spacing(SPACING)
    arrays = {}
    for arm, blur in (("good", 0.5), ("poor", 3.0)):
        for k, case_id in enumerate(CASES):
            prob, gt = _case(k, blur)
            save_nifti(root / f"pred_{arm}" / "probabilities" / f"{case_id}.nii.gz", prob, affine)
            if arm == "good":
                save_nifti(label_path(root / "dataset", case_id), gt, affine)
            arrays[arm, case_id] = (prob, gt.astype(bool))
    return root, arrays


def _evaluate(root, arm, out, *extra):
    return main(
        [
            "evaluate",
            "--predictions",
            str(root / f"pred_{arm}"),
            "--dataset",
            str(root / "dataset"),
            "--cases",
            ",".join(CASES),
            "--thresholds",
            "0.2,0.35,0.5,0.65,0.8",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_evaluate_tune_then_reuse_and_compare(study, tmp_path, capsys):
    root, arrays = study
    assert _evaluate(root, "good", tmp_path / "good", "--tune") == 0
    threshold = load_threshold(tmp_path / "good" / "threshold.json")
    assert threshold in (0.2, 0.35, 0.5, 0.65, 0.8)
    for name in ("cases.csv", "lesions.csv", "froc.csv", "summary.json", "froc.png"):
        assert (tmp_path / "good" / name).stat().st_size > 0, name

    # the written rows are the functional results at the tuned threshold
    cases = pd.read_csv(tmp_path / "good" / "cases.csv")
    lesions = pd.read_csv(tmp_path / "good" / "lesions.csv")
    for case_id in CASES:
        prob, gt = arrays["good", case_id]
        pred = binarize(prob, threshold)
        row = cases.set_index("case_id").loc[case_id]
        expected = lesion_detection(pred, gt, SPACING)
        assert (row.n_gt, row.n_detected, row.n_fp) == (
            expected.n_gt,
            expected.n_detected,
            expected.n_false_positive,
        )
        assert row.f2 == pytest.approx(expected.f2, abs=1e-6)
        scores = lesion_scores(pred, gt, SPACING, 2.0)
        own = lesions[lesions.case_id == case_id]
        assert own.dice.to_numpy() == pytest.approx([s.dice for s in scores], abs=1e-6)
    summary = json.loads((tmp_path / "good" / "summary.json").read_text())
    assert summary["operating_point"]["threshold"] == threshold
    assert summary["metrics"]["f2"] == pytest.approx(np.nanmedian(cases.f2), abs=1e-6)
    assert summary["metrics"]["dice_detected"] == pytest.approx(
        np.median(lesions.dice[lesions.detected]), abs=1e-6
    )

    # the tuning threshold is reused unchanged on the other arm
    threshold_file = tmp_path / "good" / "threshold.json"
    assert _evaluate(root, "poor", tmp_path / "poor", "--threshold-file", str(threshold_file)) == 0
    poor = json.loads((tmp_path / "poor" / "summary.json").read_text())
    assert poor["operating_point"]["threshold"] == threshold

    out = tmp_path / "report"
    argv = ["compare", str(tmp_path / "good"), str(tmp_path / "poor"), "--names", "SAP", "Base"]
    assert main([*argv, "--out", str(out), "--n-resamples", "200"]) == 0
    report = (out / "report.md").read_text()
    assert "| metric | SAP | Base |" in report
    for row in ("lesion sensitivity", "F2 (detection score)", "NSD, detected lesions", "ICC(2,1)"):
        assert row in report
    assert "SAP vs Base" in report
    assert (out / "froc.png").stat().st_size > 0 and (out / "boxplots.png").stat().st_size > 0
    comparison = json.loads((out / "comparison.json").read_text())
    f2_row = next(r for r in comparison["rows"] if r["metric"] == "F2 (detection score)")
    assert f2_row["arms"]["SAP"]["estimate"] == pytest.approx(summary["metrics"]["f2"])
    p = f2_row["pvalues"]["SAP vs Base"]["p"]
    assert p is None or 0 <= p <= 1


def test_evaluate_with_splits_fold(study, tmp_path):
    root, _ = study
    splits = tmp_path / "splits.json"
    splits.write_text(
        json.dumps(
            {
                "task": "lesion",
                "n_folds": 2,
                "tuning_fold": 1,
                "seed": 0,
                "folds": [CASES[:2], CASES[2:]],
            }
        )
    )
    argv = [
        "evaluate",
        "--predictions",
        str(root / "pred_good"),
        "--dataset",
        str(root / "dataset"),
    ]
    argv += ["--splits", str(splits), "--threshold", "0.5", "--out"]
    assert main([*argv, str(tmp_path / "tuning"), "--fold", "tuning"]) == 0
    assert json.loads((tmp_path / "tuning" / "summary.json").read_text())["cases"] == CASES[2:]
    assert main([*argv, str(tmp_path / "test"), "--fold", "0"]) == 0
    assert json.loads((tmp_path / "test" / "summary.json").read_text())["cases"] == CASES[:2]


def test_binary_masks_are_evaluated_without_froc(study, tmp_path):
    root, arrays = study
    affine = affine_from_spacing(SPACING)
    masks = tmp_path / "masks"
    for case_id in CASES:
        save_nifti(
            masks / f"{case_id}.nii.gz",
            binarize(arrays["good", case_id][0], 0.5).astype(np.uint8),
            affine,
        )
    argv = ["evaluate", "--predictions", str(masks), "--dataset", str(root / "dataset")]
    assert main([*argv, "--cases", ",".join(CASES), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["operating_point"]["source"] == "binary masks"
    assert summary["metrics"]["froc_auc"] is None and not (tmp_path / "out" / "froc.png").exists()
    with_prob = _evaluate(root, "good", tmp_path / "prob", "--threshold", "0.5")
    assert with_prob == 0
    prob_summary = json.loads((tmp_path / "prob" / "summary.json").read_text())
    for key in ("sensitivity", "f2", "dice_detected", "global_dice"):
        assert summary["metrics"][key] == pytest.approx(prob_summary["metrics"][key]), key


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_clear_errors(study, tmp_path, capsys):
    root, arrays = study
    base = ["evaluate", "--dataset", str(root / "dataset"), "--out", str(tmp_path / "out")]
    pred = ["--predictions", str(root / "pred_good")]

    err = _error(capsys, [*base, *pred, "--cases", "p0,nope", "--threshold", "0.5"])
    assert "case nope" in err and "labelsTr/nope.nii.gz" in err and "not found" in err

    broken = tmp_path / "broken"
    affine = affine_from_spacing(SPACING)
    save_nifti(broken / "probabilities" / "p0.nii.gz", arrays["good", "p0"][0], affine)
    err = _error(capsys, [*base, "--predictions", str(broken), "--cases", "p0,p1", "--tune"])
    assert "case p1" in err and "probabilities/p1.nii.gz" in err and "broken/p1.nii.gz" in err
    save_nifti(broken / "probabilities" / "p0.nii.gz", np.zeros((5, 5, 5), np.float32), affine)
    err = _error(
        capsys, [*base, "--predictions", str(broken), "--cases", "p0", "--threshold", "0.5"]
    )
    assert "case p0" in err and "shape" in err and "probabilities/p0.nii.gz" in err

    shifted = affine.copy()
    shifted[0, 3] = 7.0
    save_nifti(broken / "probabilities" / "p0.nii.gz", arrays["good", "p0"][0], shifted)
    err = _error(
        capsys, [*base, "--predictions", str(broken), "--cases", "p0", "--threshold", "0.5"]
    )
    assert "case p0" in err and "affine" in err

    save_nifti(broken / "probabilities" / "p0.nii.gz", arrays["good", "p0"][0] * 3, affine)
    err = _error(
        capsys, [*base, "--predictions", str(broken), "--cases", "p0", "--threshold", "0.5"]
    )
    assert "case p0" in err and "[0, 1]" in err

    err = _error(capsys, [*base, *pred, "--cases", "p0"])
    assert "--threshold" in err

    err = _error(capsys, ["compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")])
    assert "summary.json" in err and "nothing" in err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_tuning_on_a_test_fold_is_refused(study, tmp_path, capsys):
    root, _ = study
    splits = tmp_path / "splits.json"
    folds = [CASES[i::3] for i in range(3)]
    splits.write_text(
        json.dumps({"task": "lesion", "n_folds": 3, "tuning_fold": 0, "seed": 0, "folds": folds})
    )
    common = [
        "evaluate",
        "--predictions",
        str(root / "pred_good"),
        "--dataset",
        str(root / "dataset"),
        "--splits",
        str(splits),
        "--tune",
    ]
    err = _error(capsys, [*common, "--fold", "1", "--out", str(tmp_path / "bad")])
    assert "tuning fold only" in err and "--fold 0" in err
    assert not (tmp_path / "bad").exists()
    assert main([*common, "--fold", "tuning", "--out", str(tmp_path / "good")]) == 0
    choice = json.loads((tmp_path / "good" / "threshold.json").read_text())
    assert sorted(choice["cases"]) == sorted(folds[0])

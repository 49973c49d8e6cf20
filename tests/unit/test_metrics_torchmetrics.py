"""torchmetrics wrappers: same numbers as the functional core, DDP-safe states, de-duplication."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sap_lightning.evaluation import froc_auc, icc_2_1
from sap_lightning.metrics import (
    LesionDetection,
    LesionSegmentationQuality,
    binarize,
    dice,
    froc_counts,
    lesion_detection,
    lesion_scores,
    make_lesion_metrics,
)
from sap_lightning.metrics.lesion import case_hash

SPACING = (1.5, 2.0, 4.0)
SHAPE = (32, 28, 14)
THRESHOLDS = (0.2, 0.4, 0.6, 0.8)


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A probability map with bumps near GT ellipsoids plus false-positive bumps."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")
    extent = np.array(SHAPE) * np.array(SPACING)
    gt = np.zeros(SHAPE, dtype=bool)
    prob = np.zeros(SHAPE, dtype=np.float32)
    for k in range(rng.integers(2, 5)):
        center = rng.uniform(0.15, 0.85, 3) * extent
        radii = rng.uniform(3.0, 9.0, 3)
        gt |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1
        if k % 3 != 2:  # some lesions are missed
            moved = center + rng.normal(0, 1.5, 3)
            d2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, moved, radii * 1.2))
            prob = np.maximum(prob, rng.uniform(0.5, 1.0) * np.exp(-d2))
    for _ in range(rng.integers(1, 3)):
        center = rng.uniform(0.1, 0.9, 3) * extent
        d2 = sum(((g - c) / 4.0) ** 2 for g, c in zip(grid, center))
        prob = np.maximum(prob, rng.uniform(0.3, 0.9) * np.exp(-d2))
    return prob.astype(np.float32), gt


CASES = {f"case_{k:02d}": _case(k) for k in range(5)}


def _filled(metric, cases=CASES):
    for case_id, (prob, gt) in cases.items():
        metric.update(torch.from_numpy(prob), torch.from_numpy(gt), SPACING, case_id)
    return metric


def _median(values):
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else math.nan


def test_detection_equals_functional():
    metric = _filled(LesionDetection(threshold=0.5, froc_thresholds=THRESHOLDS))
    values = {k: float(v) for k, v in metric.compute().items()}
    results = [
        lesion_detection(binarize(p, 0.5), g, SPACING, min_volume_ml=0.0) for p, g in CASES.values()
    ]
    large = [
        lesion_detection(binarize(p, 0.5), g, SPACING, min_volume_ml=1.0) for p, g in CASES.values()
    ]
    assert values["n_cases"] == 5
    for suffix, rows in (("", results), ("_1ml", large)):
        assert values[f"sensitivity{suffix}"] == pytest.approx(
            _median([r.sensitivity for r in rows]), abs=1e-6, nan_ok=True
        )
        assert values[f"precision{suffix}"] == pytest.approx(
            _median([r.precision for r in rows]), abs=1e-6, nan_ok=True
        )
        assert values[f"f2{suffix}"] == pytest.approx(_median([r.f2 for r in rows]), abs=1e-6)
        assert values[f"fp_per_exam{suffix}"] == _median([r.n_false_positive for r in rows])
        assert values[f"mean_fp_per_exam{suffix}"] == pytest.approx(
            np.mean([r.n_false_positive for r in rows]), abs=1e-6
        )
    table = metric.case_table()
    assert table["case_id"].tolist() == list(CASES)
    assert table["n_detected"].tolist() == [r.n_detected for r in results]
    assert table["n_fp_1ml"].tolist() == [r.n_false_positive for r in large]


def test_froc_auc_equals_the_functional_counts():
    metric = _filled(LesionDetection(threshold=0.5, froc_thresholds=THRESHOLDS))
    counts = [froc_counts(p, g, SPACING, THRESHOLDS) for p, g in CASES.values()]  # grid only
    sensitivity = np.array([c.n_detected / c.n_gt for c in counts])  # every case has lesions
    fp = np.array([c.n_pred - c.n_pred_matched for c in counts])
    expected = froc_auc(fp.mean(axis=0), sensitivity.mean(axis=0), 15.0)
    assert float(metric.compute()["froc_auc"]) == pytest.approx(expected, abs=1e-6)
    curve = metric.froc()
    assert curve["thresholds"].tolist() == [0.2, 0.4, 0.6, 0.8]  # the operating 0.5 is not drawn
    assert curve["mean_fp"] == pytest.approx(fp.mean(axis=0))


def test_segmentation_equals_functional():
    metric = _filled(LesionSegmentationQuality(threshold=0.5, tolerance_mm=2.0))
    values = {k: float(v) for k, v in metric.compute().items()}
    rows, per_patient, global_dice, volumes = [], [], [], []
    for prob, gt in CASES.values():
        pred = binarize(prob, 0.5)
        scores = lesion_scores(pred, gt, SPACING, 2.0)
        rows += scores
        per_patient.append(np.mean([s.dice for s in scores]))
        global_dice.append(dice(pred, gt))
        volumes.append([pred.sum() * 0.012, gt.sum() * 0.012])
    detected = [s for s in rows if s.detected]
    assert values["dice_detected"] == pytest.approx(_median([s.dice for s in detected]), abs=1e-6)
    assert values["nsd_detected"] == pytest.approx(_median([s.nsd for s in detected]), abs=1e-6)
    assert values["patient_mean_dice"] == pytest.approx(_median(per_patient), abs=1e-6)
    assert values["global_dice"] == pytest.approx(_median(global_dice), abs=1e-6)
    assert values["volume_icc"] == pytest.approx(icc_2_1(np.array(volumes)), abs=1e-5)
    lesions = metric.lesion_table()
    assert len(lesions) == len(rows)
    assert lesions["dice"].to_numpy() == pytest.approx([s.dice for s in rows], abs=1e-6)
    assert lesions["nsd"].to_numpy() == pytest.approx([s.nsd for s in rows], abs=1e-6)


def test_duplicated_cases_are_dropped():
    once = make_lesion_metrics(threshold=0.5, froc_thresholds=THRESHOLDS)
    twice = make_lesion_metrics(threshold=0.5, froc_thresholds=THRESHOLDS)
    _filled(once)
    _filled(twice)
    first = next(iter(CASES))
    prob, gt = CASES[first]
    twice.update(torch.from_numpy(prob), torch.from_numpy(gt), spacing=SPACING, case_id=first)
    a, b = once.compute(), twice.compute()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) or (a[key].isnan() and b[key].isnan()), key
    assert len(twice["segmentation"].lesion_table()) == len(once["segmentation"].lesion_table())


def test_collection_returns_flat_scalar_tensors():
    metrics = make_lesion_metrics(threshold=0.5, froc_thresholds=THRESHOLDS, prefix="val/")
    prob, gt = CASES["case_00"]
    # a collated batch of one: leading singleton dimensions, (1, 3) spacing, a list of one id
    metrics.update(
        torch.from_numpy(prob)[None, None],
        torch.from_numpy(gt)[None, None],
        spacing=torch.tensor([SPACING]),
        case_id=["case_00"],
    )
    values = metrics.compute()
    assert {"val/f2", "val/froc_auc", "val/dice_detected", "val/mean_sensitivity_1ml"} <= set(
        values
    )
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in values.values())


def test_states_are_one_dimensional_float_tensors():
    # an int64 or 2-D list state crashes the DDP all-gather when one rank has no case
    metrics = _filled(make_lesion_metrics(threshold=0.5, froc_thresholds=THRESHOLDS))
    for metric in metrics.values():
        for name in metric._defaults:
            state = getattr(metric, name)
            assert isinstance(state, list) and state, name
            assert all(t.ndim == 1 and t.dtype == torch.float32 for t in state), name


def test_case_hash_survives_float32():
    ids = ["case_00", "case_01", "patient-0123", "x" * 200, "é"]
    halves = [case_hash(c) for c in ids]
    stored = torch.tensor(halves, dtype=torch.float32).double().numpy()
    assert [tuple(map(int, row)) for row in stored] == halves
    assert len(set(halves)) == len(ids)


def test_binary_predictions_match_thresholded_probabilities():
    prob_metric = _filled(LesionSegmentationQuality(threshold=0.5))
    binary = {c: (binarize(p, 0.5), g) for c, (p, g) in CASES.items()}
    mask_metric = _filled(LesionSegmentationQuality(threshold=0.5), binary)
    a, b = prob_metric.compute(), mask_metric.compute()
    assert all(torch.allclose(a[k], b[k], equal_nan=True) for k in a)


def test_empty_metric_computes_nan():
    with pytest.warns(UserWarning, match="before the ``update``"):
        values = LesionDetection(froc_thresholds=THRESHOLDS).compute()
    assert values["n_cases"] == 0 and values["f2"].isnan()


def test_bad_case_shape_is_rejected():
    with pytest.raises(ValueError, match="one case"):
        LesionDetection().update(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4), SPACING, "a")
    with pytest.raises(ValueError, match="one case per update"):
        LesionDetection().update(torch.zeros(4, 4, 4), torch.zeros(4, 4, 4), SPACING, ["a", "b"])


def test_froc_area_does_not_depend_on_the_operating_threshold():
    rng = np.random.default_rng(7)
    target = np.zeros((24, 24, 12), bool)
    target[3:7, 3:7, 2:5] = target[14:18, 12:16, 6:9] = True
    prob = np.clip(target * 0.6 + rng.random(target.shape) * 0.5, 0, 1).astype(np.float32)
    grid = (0.2, 0.4, 0.6, 0.8)
    areas = set()
    for operating in (0.4, 0.33):  # on the grid, and off it
        metric = LesionDetection(threshold=operating, froc_thresholds=grid)
        metric.update(prob, target, (1.5, 1.5, 4.0), "c0")
        assert list(metric.froc()["thresholds"]) == list(grid)
        assert sorted(metric.froc_table()["threshold"].unique()) == list(grid)
        areas.add(float(metric.compute()["froc_auc"]))
    assert len(areas) == 1


def test_median_f2_leaves_lesion_free_patients_out():
    """Worked case: one patient with two lesions, one found and one missed, no false positive
    (R = 1/2, P = 1: F2 = 5 x 1 x 0.5 / (4 + 0.5) = 5/9), a clean lesion-free patient (F2 flag
    1) and one with a false positive (flag 0, precision 0). The medians over the patients with a
    lesion: F2 5/9 (not median(5/9, 1, 0)), precision 1, no false positive; the lesion-free
    patients' false positives apart: median(0, 1) = 0.5."""
    gt = np.zeros((12, 12, 12), np.uint8)
    gt[1:4, 1:4, 1:4] = 1
    gt[7:10, 7:10, 7:10] = 1
    prob = np.where(np.arange(12)[:, None, None] < 5, gt, 0).astype(np.float32)
    empty = np.zeros_like(gt)
    blob = np.zeros(gt.shape, np.float32)
    blob[5:8, 5:8, 5:8] = 0.9
    cases = {"lesions": (prob, gt), "free_a": (empty.astype(np.float32), empty),
             "free_b": (blob, empty)}  # fmt: skip
    values = _filled(LesionDetection(froc_thresholds=THRESHOLDS), cases).compute()
    assert values["f2"].item() == pytest.approx(5 / 9, abs=1e-6)
    assert values["precision"].item() == 1.0 and values["fp_per_exam"].item() == 0.0
    assert values["fp_per_exam_lesion_free"].item() == 0.5 and values["n_cases"].item() == 3
    # the >= 1 mL subset (lesions of 27 voxels x 12 uL = 0.32 mL): no patient has one
    assert math.isnan(values["f2_1ml"].item())

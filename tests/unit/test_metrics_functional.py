"""Functional lesion metrics against worked values (docs/evaluation.md examples and the cases below), MONAI and panoptica."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import cc3d
import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_surface_dice
from scipy import ndimage

from sap_lightning.metrics.arrays import binarize
from sap_lightning.metrics.functional import (
    f2_score,
    froc_counts,
    lesion_detection,
    lesion_scores,
    match_lesions,
)
from sap_lightning.metrics.overlap import dice, surface_dice

# ---------------------------------------------------------------------------- worked geometry
# Worked case: shape (128, 128, 48), spacing (1.5, 1.5, 5.0) mm in array axis order, voxel i
# at i * spacing; ellipsoid = voxels with sum(((x_k - c_k) / r_k)^2) <= 1.

SHAPE = (128, 128, 48)
SPACING = (1.5, 1.5, 5.0)
GRID = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")


def ellipsoid(center, radii):
    return sum(((g - c) / r) ** 2 for g, c, r in zip(GRID, center, radii)) <= 1


def sphere(center, radius):
    return ellipsoid(center, (radius, radius, radius))


A = ellipsoid((60, 60, 100), (12, 12, 15))
B = sphere((140, 60, 100), 5)
C = sphere((60, 140, 160), 8)
A_PRED = ellipsoid((63, 60, 100), (13, 12, 15))
B_PRED = sphere((141, 61, 100), 5)
D = sphere((140, 140, 60), 7)
E = sphere((100, 100, 200), 3)
MAIN_GT, MAIN_PRED = A | B | C, A_PRED | B_PRED | D | E
SIMPLE_GT = ellipsoid((96, 96, 120), (20, 20, 30))
SIMPLE_PRED = ellipsoid((96, 96, 125), (20, 20, 30))

WORKED = {
    # case: (pred, gt, voxels gt, voxels pred, Dice, NSD 2.0 mm, NSD 2.5 mm)
    "simple": (SIMPLE_PRED, SIMPLE_GT, 4445, 4445, 0.875591, 0.783797, 0.825369),
    "main": (MAIN_PRED, MAIN_GT, 1007, 1029, 0.689587, 0.652981, 0.686744),
}


@pytest.mark.parametrize("case", sorted(WORKED))
def test_worked_whole_mask_values(case):
    pred, gt, n_gt, n_pred, expected_dice, nsd_2, nsd_25 = WORKED[case]
    assert (gt.sum(), pred.sum()) == (n_gt, n_pred)
    assert dice(pred, gt) == pytest.approx(expected_dice, abs=1e-6)
    assert surface_dice(pred, gt, SPACING, 2.0) == pytest.approx(nsd_2, abs=1e-6)
    assert surface_dice(pred, gt, SPACING, 2.5) == pytest.approx(nsd_25, abs=1e-6)


def test_worked_volumes():
    ml = 1.5 * 1.5 * 5.0 / 1000
    volumes = [m.sum() * ml for m in (A, B, C, A_PRED, B_PRED, D, E)]
    assert volumes == pytest.approx([8.674, 0.416, 2.239, 9.529, 0.416, 1.485, 0.146], abs=5e-4)


def test_worked_per_lesion_scores():
    rows = {round(r.volume_ml, 3): r for r in lesion_scores(MAIN_PRED, MAIN_GT, SPACING, 2.0)}
    a, b, c = rows[8.674], rows[0.416], rows[2.239]
    assert (a.detected, b.detected, c.detected) == (True, True, False)
    assert a.dice == pytest.approx(0.8294, abs=5e-5)
    assert a.nsd == pytest.approx(0.8496, abs=5e-5)
    assert b.dice == pytest.approx(0.8378, abs=5e-5)
    assert b.nsd == pytest.approx(1.0, abs=1e-12)
    assert (c.dice, c.nsd, c.pred_volume_ml, c.n_pred_components) == (0.0, 0.0, 0.0, 0)
    # the per-lesion crop gives exactly the whole-volume computation on that lesion
    assert a.nsd == pytest.approx(surface_dice(A_PRED, A, SPACING, 2.0), abs=1e-12)
    assert a.dice == pytest.approx(dice(A_PRED, A), abs=1e-12)


@pytest.mark.parametrize("connectivity", [6, 26])
def test_worked_detection_counts(connectivity):
    r = lesion_detection(MAIN_PRED, MAIN_GT, SPACING, connectivity=connectivity)
    assert (r.n_gt, r.n_pred, r.n_detected, r.n_false_positive, r.n_missed) == (3, 4, 2, 2, 1)
    assert r.sensitivity == pytest.approx(2 / 3)
    assert r.precision == pytest.approx(0.5)
    assert r.f2 == pytest.approx(0.625, abs=1e-12)  # 5TP / (5TP + 4FN + FP) = 10 / 16
    large = lesion_detection(MAIN_PRED, MAIN_GT, SPACING, connectivity, min_volume_ml=1.0)
    assert (large.n_gt, large.n_pred, large.n_detected, large.n_false_positive) == (2, 2, 1, 1)
    assert (large.sensitivity, large.precision, large.f2) == pytest.approx((0.5, 0.5, 0.5))


def test_split_lesion_any_overlap_versus_one_to_one():
    gt = sphere((96, 96, 120), 10)
    slab = (GRID[0] >= 96 - 1.5) & (GRID[0] < 96 + 1.5)  # 3 mm = two voxel planes
    pred = gt & ~slab
    assert cc3d.connected_components(pred, connectivity=6, return_N=True)[1] == 2
    per_side = lesion_detection(pred, gt, SPACING)
    assert (per_side.sensitivity, per_side.n_false_positive, per_side.precision) == (1.0, 0, 1.0)
    strict = lesion_detection(pred, gt, SPACING, matching="one_to_one", iou_threshold=0.5)
    assert (strict.n_detected, strict.n_false_positive, strict.n_missed) == (0, 2, 1)


def test_merged_lesions_any_overlap_versus_one_to_one():
    gt = sphere((60, 96, 120), 8) | sphere((84, 96, 120), 8)
    bridge = (abs(GRID[0] - 72) <= 12) & (abs(GRID[1] - 96) <= 4) & (abs(GRID[2] - 120) <= 5)
    pred = sphere((60, 96, 120), 8.5) | sphere((84, 96, 120), 8.5) | bridge
    per_side = lesion_detection(pred, gt, SPACING)
    assert (per_side.n_gt, per_side.n_pred) == (2, 1)
    assert (per_side.sensitivity, per_side.n_false_positive) == (1.0, 0)
    any_one = lesion_detection(pred, gt, SPACING, matching="one_to_one", iou_threshold=0.0)
    assert (any_one.n_detected, any_one.n_missed, any_one.n_false_positive) == (1, 1, 0)
    assert lesion_detection(pred, gt, SPACING, matching="one_to_one").n_detected == 0


def test_match_lesions_flags_each_lesion_and_component_as_detection_counts_them():
    """The per-component view (pictures draw it) flags exactly what lesion_detection counts,
    split and merged lesions included, and its ids are connected components of each mask."""
    gt = sphere((60, 96, 120), 8) | sphere((84, 96, 120), 8) | sphere((30, 30, 60), 6)
    bridge = (abs(GRID[0] - 72) <= 12) & (abs(GRID[1] - 96) <= 4) & (abs(GRID[2] - 120) <= 5)
    slab = (GRID[0] >= 30 - 1.5) & (GRID[0] < 30 + 1.5)
    false_positive = sphere((150, 150, 150), 6)
    pred = sphere((60, 96, 120), 8.5) | sphere((84, 96, 120), 8.5) | bridge
    pred = pred | (sphere((30, 30, 60), 6) & ~slab) | false_positive
    for matching in ("any_overlap", "one_to_one"):
        match = match_lesions(pred, gt, matching=matching)
        counts = lesion_detection(pred, gt, SPACING, matching=matching)
        assert (len(match.gt_detected), len(match.pred_matched)) == (counts.n_gt, counts.n_pred)
        assert match.gt_detected.sum() == counts.n_detected
        assert match.pred_matched.sum() == counts.n_pred_matched
    match = match_lesions(pred, gt)
    assert match.gt_detected.tolist() == [True, True, True]  # merged pair and the split lesion
    fp_id = match.pred_labels[100, 100, 30]  # the centre of the false positive (150 mm)
    assert fp_id > 0 and not match.pred_matched[fp_id - 1]
    assert match.pred_matched.sum() == 3  # the merged blob and both halves of the split one
    assert (match.pred_labels > 0).sum() == pred.sum() and (match.gt_labels > 0).sum() == gt.sum()


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI internal
@pytest.mark.parametrize(("axis", "step"), [(0, 1.5), (2, 5.0)])
def test_tolerance_is_inclusive_at_a_voxel_step(axis, step):
    box = np.zeros((20, 20, 12), dtype=bool)
    box[5:12, 6:14, 3:8] = True
    shifted = np.roll(box, 1, axis=axis)  # every surface moves by exactly one voxel step
    assert surface_dice(shifted, box, SPACING, step) == 1.0
    assert surface_dice(shifted, box, SPACING, step - 1e-6) < 1.0
    for tolerance in (step, step - 1e-6):
        monai = compute_surface_dice(
            torch.from_numpy(shifted)[None, None],
            torch.from_numpy(box)[None, None],
            [tolerance],
            include_background=True,
            spacing=SPACING,
            use_subvoxels=True,
        )
        assert surface_dice(shifted, box, SPACING, tolerance) == pytest.approx(
            float(monai), abs=1e-6
        )


def _random_blobs(rng, shape, n_blobs, fill=0.3):
    """Irregular masks: smoothed noise above a quantile, restricted to a few random boxes."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.2)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n_blobs):
        lo = [rng.integers(1, n - 6) for n in shape]
        size = [rng.integers(3, max(4, n // 3)) for n in shape]
        region = tuple(slice(a, min(a + s, n - 1)) for a, s, n in zip(lo, size, shape))
        mask[region] |= noise[region] > np.quantile(noise, 1 - fill)
    return mask


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI internal
@pytest.mark.parametrize("seed", range(4))
def test_dice_and_surface_dice_agree_with_monai(seed):
    rng = np.random.default_rng(seed)
    shape, spacing = (26, 22, 14), (0.8, 1.3, 3.1)
    gt = _random_blobs(rng, shape, 3)
    pred = gt ^ (rng.random(shape) < 0.08) if seed % 2 else _random_blobs(rng, shape, 3)
    p, g = torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None]
    assert dice(pred, gt) == pytest.approx(float(compute_dice(p, g)), abs=1e-6)
    for tolerance in (1.0, 2.0, 3.5):
        expected = compute_surface_dice(
            p, g, [tolerance], include_background=True, spacing=spacing, use_subvoxels=True
        )
        assert surface_dice(pred, gt, spacing, tolerance) == pytest.approx(
            float(expected), abs=2e-6
        )


def test_axis_order_of_spacing_matters():
    # the worked NSD holds only with the spacing in array axis order
    assert surface_dice(SIMPLE_PRED, SIMPLE_GT, (5.0, 1.5, 1.5), 2.0) != pytest.approx(
        0.783797, abs=1e-3
    )


def test_torch_and_numpy_inputs_agree():
    t_pred, t_gt = torch.from_numpy(MAIN_PRED), torch.from_numpy(MAIN_GT.astype(np.uint8))
    assert dice(t_pred, t_gt) == dice(MAIN_PRED, MAIN_GT)
    assert lesion_detection(t_pred, t_gt, torch.tensor(SPACING)) == lesion_detection(
        MAIN_PRED, MAIN_GT, SPACING
    )


def test_empty_mask_conventions():
    empty = np.zeros((12, 12, 6), dtype=bool)
    blob = empty.copy()
    blob[3:6, 3:6, 2:4] = True
    assert dice(empty, empty) == 1.0 and surface_dice(empty, empty, SPACING) == 1.0
    assert dice(blob, empty) == 0.0 and surface_dice(blob, empty, SPACING) == 0.0
    assert surface_dice(empty, blob, SPACING) == 0.0

    nothing = lesion_detection(empty, empty, SPACING)
    assert math.isnan(nothing.sensitivity) and math.isnan(nothing.precision)
    assert nothing.f2 == 1.0  # a lesion-free patient with no false positive is perfect
    only_fp = lesion_detection(blob, empty, SPACING)
    assert math.isnan(only_fp.sensitivity) and only_fp.precision == 0.0 and only_fp.f2 == 0.0
    only_missed = lesion_detection(empty, blob, SPACING)
    assert math.isnan(only_missed.precision) and only_missed.sensitivity == 0.0
    assert only_missed.f2 == 0.0
    assert lesion_scores(blob, empty, SPACING) == []
    (missed,) = lesion_scores(empty, blob, SPACING)
    assert (missed.detected, missed.dice, missed.nsd) == (False, 0.0, 0.0)


def test_f2_convention_for_an_undefined_side():
    # large lesions all found by small components: no large component, nothing wrong -> 1
    assert f2_score(1.0, math.nan) == 1.0
    assert f2_score(0.5, math.nan) == pytest.approx(5 * 0.5 / 4.5)
    assert f2_score(math.nan, 0.0) == 0.0
    assert f2_score(0.0, 0.0) == 0.0
    assert f2_score(2 / 3, 0.5) == pytest.approx(0.625)


def test_large_lesion_found_by_a_small_component():
    gt = sphere((96, 96, 120), 8)  # 2.2 mL
    pred = sphere((96, 96, 120), 4)  # 0.3 mL, inside the lesion
    r = lesion_detection(pred, gt, SPACING, min_volume_ml=1.0)
    assert (r.n_gt, r.n_detected, r.n_pred) == (1, 1, 0)
    assert r.sensitivity == 1.0 and math.isnan(r.precision) and r.f2 == 1.0


def test_bad_inputs_are_rejected():
    mask = np.zeros((4, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        dice(mask, np.zeros((4, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="3D"):
        lesion_detection(mask[0], mask[0], SPACING)
    with pytest.raises(ValueError, match="spacing"):
        lesion_detection(mask, mask, (1.0, 1.0))
    with pytest.raises(ValueError, match="connectivity"):
        lesion_detection(mask, mask, SPACING, connectivity=8)
    with pytest.raises(ValueError, match="matching"):
        lesion_detection(mask, mask, SPACING, matching="hungarian")
    with pytest.raises(ValueError, match="thresholds"):
        froc_counts(mask.astype(np.float32), mask, SPACING, [0.0, 0.5])


def _random_probability(rng, shape, n_blobs):
    """Gaussian bumps of random height: nested components that split as the threshold rises."""
    grid = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    prob = np.zeros(shape, dtype=np.float32)
    for _ in range(n_blobs):
        center = [rng.uniform(0, n) for n in shape]
        width = rng.uniform(1.0, 3.0)
        d2 = sum(((g - c) / width) ** 2 for g, c in zip(grid, center))
        prob = np.maximum(prob, (rng.uniform(0.3, 1.0) * np.exp(-d2)).astype(np.float32))
    return prob


@pytest.mark.parametrize(("seed", "quantised"), [(0, False), (1, False), (2, True), (3, True)])
def test_froc_counts_equal_lesion_detection_at_every_threshold(seed, quantised):
    rng = np.random.default_rng(seed)
    shape, spacing = (30, 26, 16), (2.0, 2.0, 5.0)
    prob = _random_probability(rng, shape, 12)
    if quantised:  # plateaus, with values exactly on the thresholds (>= is inclusive)
        prob = (np.round(prob * 20) / 20).astype(np.float32)
    gt = _random_blobs(rng, shape, 5, fill=0.25)
    thresholds = np.round(np.arange(0.05, 1.0, 0.05), 2)
    counts = froc_counts(prob, gt, spacing, thresholds, connectivity=6, min_volume_ml=0.3)
    assert counts.n_pred.max() > 1  # the case exercises the relabelling
    for k, t in enumerate(counts.thresholds):
        mask = binarize(prob, t)
        assert counts.at(k) == lesion_detection(mask, gt, spacing)
        assert counts.at(k, large=True) == lesion_detection(mask, gt, spacing, min_volume_ml=0.3)


# ---------------------------------------------------------------------------- panoptica
# panoptica 2.1.7 pins numpy < 2.3, pandas < 3 and cc3d < 4, which clash with this project's
# environment, so it lives in its own virtual environment and runs in a subprocess.

PANOPTICA_SCRIPT = r"""
import json, sys
import numpy as np
from panoptica import (ConnectedComponentsInstanceApproximator, InputType,
                       NaiveThresholdMatching, Panoptica_Evaluator)
from panoptica.metrics import Metric

data = np.load(sys.argv[1])
results = []
for threshold in data["thresholds"]:
    evaluator = Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(),
        instance_matcher=NaiveThresholdMatching(
            matching_metric=Metric.IOU, matching_threshold=float(threshold)
        ),
        instance_metrics=[Metric.DSC],
        global_metrics=[Metric.DSC],
        verbose=False,
    )
    for pred, ref in zip(data["preds"], data["refs"]):
        r = evaluator.evaluate(
            pred.astype(np.uint8), ref.astype(np.uint8),
            voxelspacing=tuple(data["spacing"]), verbose=False,
        )["ungrouped"]
        results.append([float(threshold), int(r.tp), int(r.fp), int(r.fn)])
print("RESULT " + json.dumps(results))
"""


def _panoptica_python() -> Path | None:
    configured = os.environ.get("SAP_PANOPTICA_PYTHON")
    default = Path(__file__).resolve().parents[2] / ".venv-panoptica" / "bin" / "python"
    path = Path(configured) if configured else default
    return path if path.is_file() else None


def _perturbed_lesions(rng, shape):
    """GT ellipsoids and a prediction with shifted, shrunk, split, merged and extra blobs."""
    grid = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    gt = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(4, 8)):
        center = np.array([rng.uniform(4, n - 4) for n in shape])
        radii = rng.uniform(1.5, 4.0, 3)
        gt |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1
        if rng.random() < 0.8:
            moved = center + rng.normal(0, 1.0, 3)
            scaled = radii * rng.uniform(0.6, 1.4, 3)
            pred |= sum(((g - c) / r) ** 2 for g, c, r in zip(grid, moved, scaled)) <= 1
    for _ in range(rng.integers(1, 4)):
        center = np.array([rng.uniform(2, n - 2) for n in shape])
        pred |= sum(((g - c) / 1.5) ** 2 for g, c in zip(grid, center)) <= 1
    return pred, gt


def test_one_to_one_counts_agree_with_panoptica(tmp_path):
    python = _panoptica_python()
    if python is None:
        pytest.skip("panoptica venv not found (make panoptica-venv, or set SAP_PANOPTICA_PYTHON)")
    rng = np.random.default_rng(7)
    shape, spacing = (36, 30, 18), (1.2, 0.9, 3.0)
    pairs = [_perturbed_lesions(rng, shape) for _ in range(6)]
    thresholds = [0.5, 0.25]
    arrays = tmp_path / "pairs.npz"
    np.savez(
        arrays,
        preds=np.stack([p for p, _ in pairs]),
        refs=np.stack([g for _, g in pairs]),
        spacing=np.array(spacing),
        thresholds=np.array(thresholds),
    )
    run = subprocess.run(
        [str(python), "-c", PANOPTICA_SCRIPT, str(arrays)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    reference = json.loads(line[len("RESULT ") :])
    ours = []
    for threshold in thresholds:
        for pred, gt in pairs:
            # panoptica labels with cc3d's default connectivity, 26
            r = lesion_detection(
                pred, gt, spacing, connectivity=26, matching="one_to_one", iou_threshold=threshold
            )
            ours.append([threshold, r.n_detected, r.n_false_positive, r.n_missed])
    assert ours == reference
    assert any(row[1] > 0 for row in ours) and any(row[2] > 0 for row in ours)


def test_lesion_free_patients_enter_the_median_f2_symmetrically():
    # a: one lesion found plus one FP; b: no lesion, nothing predicted; c: no lesion, 2 FPs.
    # b (perfect) and c (all wrong) must both count, or the median favours predicting nothing
    # only on the patients that happen to have false positives.
    rates = [f2_score(1.0, 0.5), f2_score(math.nan, math.nan), f2_score(math.nan, 0.0)]
    assert rates == [pytest.approx(5 * 0.5 / 3.0), 1.0, 0.0]
    assert float(np.median(rates)) == pytest.approx(5 * 0.5 / 3.0)
